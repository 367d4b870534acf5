"""Start a VLRM training run.

    python launch.py --config configs/shapes.yaml                  # mode from the config
    python launch.py --config configs/shapes.yaml --mode local     # single process, no Ray
    python launch.py --resume runs/latest [--total_steps 400]      # continue a run
    python launch.py --help                                        # every config key

``--resume PATH`` takes a run folder (its newest checkpoint) or a checkpoint folder. Without
``--config`` the run's own ``config.yaml`` is the base, so only the overrides given change.
Everything else is a config override (``--section.key=value``, see ``vlrm.config``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from vlrm.config import ConfigError, load_config, parse_cli, split_cli

__all__ = ["main", "peel_resume"]


def peel_resume(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(--resume value or None, the other arguments)``."""
    rest: list[str] = []
    resume: str | None = None
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume" or a.startswith("--resume="):
            if a == "--resume":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("--resume needs a run folder or checkpoint: --resume runs/latest",
                                      source="command line")
                val = argv[i + 1]
                i += 1
            else:
                val = a.split("=", 1)[1]
            if resume is not None:
                raise ConfigError(f"--resume given twice ({resume!r} and {val!r})", source="command line")
            resume = val
        else:
            rest.append(a)
        i += 1
    return resume, rest


def main(argv: Sequence[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parse_cli(["--help"])  # prints every key, exits
    try:
        resume, rest = peel_resume(argv)
        if resume is not None:
            from vlrm.run import CONFIG_FILE, resolve_resume

            run, _ = resolve_resume(resume)
            config_path, overrides = split_cli(rest)
            cfg = load_config(config_path or run / CONFIG_FILE, overrides)
        else:
            cfg = parse_cli(rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    if cfg.mode == "local":
        from learner.loop import run_local

        return run_local(cfg, resume=resume)
    # "sync" / "async": the Ray actor-learner system.
    try:
        from actors.system import run_distributed
    except ImportError as e:
        raise SystemExit(
            f"launch.py: mode {cfg.mode!r} needs the Ray actor-learner system (actors/system.py: run_distributed), "
            f"which is not available here ({e}). Use --mode local for the single-process loop."
        ) from None
    return run_distributed(cfg, resume=resume)


if __name__ == "__main__":
    main()
