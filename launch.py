"""The ``vlrm`` command.

    vlrm train --config configs/shapes.yaml                  # mode from the config (async on Ray)
    vlrm train --config configs/shapes.yaml --mode local     # single process, no Ray
    vlrm train --resume runs/latest [--total_steps 400]      # continue a run
    vlrm train --help                                        # every config key
    vlrm evaluate --model runs/latest --data dataset_coco.json --split test --preset vlrm
    vlrm caption --model runs/latest --out captions.jsonl photos/
    vlrm export runs/latest --out exported/
    vlrm pretrain-shapes --data data/shapes --out models/shapes
    vlrm make-shapes --out data/shapes                       # write the shapes world only

``python launch.py ARGS`` is ``vlrm train ARGS``. ``--resume PATH`` takes a run folder (its newest
checkpoint) or a checkpoint folder; without ``--config`` the run's own ``config.yaml`` is the
base, so only the overrides given change. Every other argument is a config override
(``--section.key=value``, see :mod:`vlrm.config`).

Exit status: 0 on success, 2 on a usage or configuration error (the message names the key and
where it came from), 1 with a one-line reason on any other failure.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from vlrm.config import ConfigError, format_help, load_config, parse_cli, peel_option, split_cli
from vlrm.accounting import RunInterrupted
from vlrm.data import DatasetError
from vlrm.registry import PluginError, load_target

__all__ = ["main", "train", "peel_resume", "ENGINES"]

ENGINES = {"local": "actors.local:LocalEngine", "sync": "actors.driver:DistributedEngine",
           "async": "actors.driver:DistributedEngine"}


def peel_resume(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """``(--resume value or None, the other arguments)``."""
    return peel_option(argv, "resume", "runs/latest")


def train(argv: Sequence[str], **engine_options) -> Path:
    """``vlrm train ARGS``: returns the run folder. Raises ConfigError / FileNotFoundError on bad
    arguments (``main`` turns them into exit status 2)."""
    from learner.trainer import run_training
    from vlrm.run import CONFIG_FILE, resolve_resume

    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        raise SystemExit(0)
    resume, rest = peel_resume(argv)
    if resume is not None:
        run, _ = resolve_resume(resume)
        config_path, overrides = split_cli(rest)
        cfg = load_config(config_path or run / CONFIG_FILE, overrides)
    else:
        cfg = parse_cli(rest)
    engine = load_target(ENGINES[cfg.mode], f"engine of mode {cfg.mode!r}")
    return run_training(cfg, engine, resume=resume, **engine_options)


def _pretrain_shapes(argv: Sequence[str]) -> None:
    from shapes_world.pretrain.__main__ import main as pretrain

    pretrain(list(argv))


def _make_shapes(argv: Sequence[str]) -> None:
    from shapes_world.dataset import main as make

    make(list(argv))


def _evaluate(argv: Sequence[str]) -> None:
    from vlrm.eval_command import main as evaluate

    evaluate(argv)


def _caption(argv: Sequence[str]) -> None:
    from vlrm.captioning import main as caption

    caption(argv)


def _export(argv: Sequence[str]) -> None:
    from vlrm.export import main as export

    export(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], object], str]] = {
    "train": (train, "train a captioner with RL (the Ray actor-learner system, or --mode local)"),
    "evaluate": (_evaluate, "caption a dataset split and score it (CLIP Recall, CLIPScore, BLEU/METEOR/ROUGE-L/CIDEr, ...)"),
    "caption": (_caption, "caption image files, folders or globs into JSONL"),
    "export": (_export, "a run as a Hugging Face directory with a model card and a released-style delta"),
    "pretrain-shapes": (_pretrain_shapes, "rebuild the four pretrained tiny models of the shapes world"),
    "make-shapes": (_make_shapes, "write the shapes world (Parquet splits) without training"),
}


def _usage() -> str:
    lines = ["usage: vlrm COMMAND [ARGS]   (vlrm COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<16} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``vlrm`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlrm: error: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    try:
        COMMANDS[name][0](rest)
    except (ConfigError, PluginError, FileNotFoundError, DatasetError) as e:
        print(f"vlrm {name}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's own usage errors (2) and --help (0)
        return int(e.code or 0) if not isinstance(e.code, str) else _fail(name, e.code)
    except RunInterrupted as e:  # a lost learner or head: the message says how to continue
        print(f"vlrm {name}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vlrm {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback for the log
        import traceback

        traceback.print_exc()
        return _fail(name, f"{type(e).__name__}: {e}")
    return 0


def _fail(name: str, reason: str) -> int:
    print(f"vlrm {name}: failed: {str(reason).splitlines()[0] if reason else 'unknown error'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(["train"] + sys.argv[1:]))
