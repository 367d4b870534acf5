"""Run machinery shared by the single-process loop and the Ray system.

- :class:`RunContext`: the run folder ``output_dir/run_name`` with the resolved ``config.yaml``,
  and the ``output_dir/latest`` symlink pointing at it.
- :class:`MetricsLogger`: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard
  event files in the run folder; on resume, records after the checkpoint's step are dropped so
  that the curve continues without duplicate steps.
- :func:`progress_line`: the one-line progress report (step, samples/s, reward and each
  component, plus any extra keys such as policy lag and queue depths).
- :func:`plot_learning_curve`: reward components, val R@1 and caption length vs step (PNG).
- Checkpoints: ``run/checkpoints/step_XXXXXX/`` = ``policy/`` (``CaptionPolicy.save_checkpoint``),
  ``optimizer.pt`` (the updater's state, read back with ``torch.load(weights_only=True)``),
  ``rng.pt`` (torch / numpy / python RNG states as tensors and plain values, weights-only
  loadable) and ``state.json`` (step, policy version, sampler position, extra), written last:
  a folder without ``state.json`` is an interrupted save and is ignored. Saves go to a
  temporary folder renamed into place.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from vlrm.config import RunConfig, load_config, resolve, run_dir, save_config, validate

__all__ = [
    "RunContext",
    "MetricsLogger",
    "progress_line",
    "plot_learning_curve",
    "read_metrics",
    "capture_rng_states",
    "restore_rng_states",
    "save_training_checkpoint",
    "load_training_checkpoint",
    "latest_checkpoint",
    "resolve_resume",
    "load_run_config",
    "CONFIG_FILE",
    "METRICS_FILE",
    "EVAL_FILE",
    "CURVE_FILE",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
CURVE_FILE = "learning_curve.png"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
POLICY_DIR = "policy"


# --------------------------------------------------------------------------------------
# Run folder
# --------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """A run's folder and resolved config. ``dir`` = ``output_dir/run_name``."""

    cfg: RunConfig
    dir: Path

    @classmethod
    def create(cls, cfg: RunConfig, existing: str | Path | None = None) -> "RunContext":
        """Resolve ``cfg`` (run name, value lr), create the run folder, write ``config.yaml``
        and point ``output_dir/latest`` at the folder.

        ``existing``: an existing run folder to continue (resume); ``cfg.output_dir`` and
        ``cfg.run_name`` are set to it.
        """
        cfg = resolve(cfg)
        if existing is not None:
            existing = Path(existing)
            cfg.output_dir, cfg.run_name = str(existing.parent), existing.name
        validate(cfg)
        d = run_dir(cfg)
        d.mkdir(parents=True, exist_ok=True)
        save_config(cfg, d / CONFIG_FILE)
        _point_latest(Path(cfg.output_dir), d)
        return cls(cfg, d)

    @property
    def metrics_path(self) -> Path:
        return self.dir / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.dir / CHECKPOINTS

    @property
    def eval_path(self) -> Path:
        return self.dir / EVAL_FILE

    @property
    def curve_path(self) -> Path:
        return self.dir / CURVE_FILE


def _point_latest(output_dir: Path, target: Path) -> None:
    """``output_dir/latest`` -> ``target`` (relative link, replaced atomically). A real file or
    folder named ``latest`` is left alone."""
    link = output_dir / "latest"
    if link.exists() and not link.is_symlink():
        print(f"[vlrm] not updating {link}: it is not a symlink")
        return
    tmp = output_dir / f".latest.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target.resolve(), output_dir.resolve()), tmp)
        os.replace(tmp, link)
    except OSError as e:  # e.g. a filesystem without symlinks
        print(f"[vlrm] could not update {link}: {e}")


def resolve_resume(path: str | Path) -> tuple[Path, Path]:
    """``(run folder, checkpoint folder)`` for ``--resume PATH``.

    PATH may be a run folder (its newest complete checkpoint), its ``checkpoints/`` folder, or a
    ``checkpoints/step_XXXXXX`` folder. ``runs/latest`` works too (the link is resolved).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--resume {path}: no such run folder or checkpoint")
    p = p.resolve()
    if (p / STATE_FILE).is_file():
        return p.parent.parent, p
    if p.name == CHECKPOINTS:
        p = p.parent
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise FileNotFoundError(f"--resume {path}: no complete checkpoint under {p / CHECKPOINTS}")
    return p, ckpt


def load_run_config(run: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The ``config.yaml`` of a run folder with command-line overrides applied."""
    return load_config(Path(run) / CONFIG_FILE, overrides)


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN/inf
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class MetricsLogger:
    """Appends one JSON object per :meth:`log` call to ``metrics.jsonl`` and writes every
    numeric value to TensorBoard, and a list of records (``val/examples``) as text (``run_dir``
    holds the event files; ``tensorboard --logdir runs``).

    Args:
        run_dir: the run folder.
        resume_step: continuing a run from a checkpoint at this step: records with a larger
            step are removed from ``metrics.jsonl`` and TensorBoard purges its events after it,
            so the continued curve has no duplicate steps.
        tensorboard: False writes only the JSONL file.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.path = self.dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = resume_step + 1 if resume_step is not None else None
                self._tb = SummaryWriter(log_dir=str(self.dir), purge_step=purge)
            except Exception as e:  # tensorboard missing or broken: keep the JSONL log
                print(f"[vlrm] TensorBoard logging disabled: {type(e).__name__}: {e}")

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Write ``{"step": step, "time": unix time, **metrics}``; returns the record."""
        rec = {"step": int(step), "time": time.time()}
        rec.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):  # e.g. val/examples
                    self._tb.add_text(k, "\n\n".join(" | ".join(f"{a}: {b}" for a, b in x.items()) for x in v),
                                      int(step))
                if k in ("step", "time") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()
        return rec

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.2e}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"


def progress_line(step: int, total_steps: int | None, metrics: Mapping[str, Any],
                  extra_keys: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> str:
    """``step 12/200 | 48.1 samples/s | reward 0.412 (clip 0.53 bad -0.01 repeat -0.1) | ...``.

    Reads ``samples_per_s``, ``reward`` and every ``r/<name>`` component from ``metrics``, then
    ``val/clip_recall@1`` if present, then the keys named in ``extra_keys`` (taken from
    ``metrics``) and every item of ``extra`` (e.g. ``{"lag": 1, "queue": 3}``).
    """
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
    if "reward" in metrics:
        comps = " ".join(f"{k[2:]} {_fmt(v)}" for k, v in metrics.items() if k.startswith("r/") and v is not None)
        parts.append(f"reward {_fmt(metrics['reward'])}" + (f" ({comps})" if comps else ""))
    if metrics.get("val/clip_recall@1") is not None:
        parts.append(f"val R@1 {_fmt(metrics['val/clip_recall@1'])}")
    for k in extra_keys:
        if k in metrics and metrics[k] is not None:
            parts.append(f"{k} {_fmt(metrics[k])}")
    for k, v in (extra or {}).items():
        parts.append(f"{k} {_fmt(v)}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------
# Evaluation and plots
# --------------------------------------------------------------------------------------


def plot_learning_curve(metrics_jsonl: str | Path, png: str | Path, title: str | None = None) -> Path:
    """Three panels from ``metrics.jsonl``: total reward and each ``r/<name>`` component,
    validation R@1 (``val/clip_recall@1``), mean caption length in words (``caption_words``) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_jsonl)

    def series(key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in recs:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(v)
        return xs, ys

    comps = sorted({k for r in recs for k in r if k.startswith("r/")})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key in ["reward"] + comps:
        xs, ys = series(key)
        if xs:
            ax.plot(xs, ys, label=key if key == "reward" else key[2:], lw=2 if key == "reward" else 1)
    ax.set(title="reward (batch mean)", xlabel="step")
    if ax.has_data():
        ax.legend(fontsize=8)
    ax = axes[1]
    xs, ys = series("val/clip_recall@1")
    if xs:
        ax.plot(xs, ys, marker="o")
    ax.set(title="val R@1 (evaluator CLIP)", xlabel="step", ylim=(0, 1))
    ax = axes[2]
    xs, ys = series("caption_words")
    if xs:
        ax.plot(xs, ys, label="sampled")
    xs, ys = series("val/mean_words")
    if xs:
        ax.plot(xs, ys, marker="o", label="val (greedy)")
    ax.set(title="caption length (words)", xlabel="step")
    if ax.has_data():
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors and plain values, so that
    ``torch.load(..., weights_only=True)`` reads them back."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng_states(state: Mapping[str, Any]) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), int(s["pos"]), int(s["has_gauss"]),
                             float(s["cached_gaussian"])))
    if "python" in state:
        s = state["python"]
        random.setstate((int(s["version"]), tuple(int(x) for x in s["state"].tolist()), s["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        states = state["cuda"]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _step_dir(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step_{int(step):06d}"


def save_training_checkpoint(run: str | Path, policy: Any, updater: Any, sampler: Any, step: int,
                             rng_states: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                             keep_last: int | None = None) -> Path:
    """Write ``run/checkpoints/step_XXXXXX/`` (see the module docstring); returns its path.

    ``rng_states`` default: :func:`capture_rng_states` now. ``extra``: JSON-safe values stored in
    ``state.json`` (e.g. elapsed training time, the "before" evaluation). ``keep_last`` removes
    all but the newest ``keep_last`` checkpoints.
    """
    run = Path(run)
    final = _step_dir(run, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    policy.save_checkpoint(tmp / POLICY_DIR)
    if updater is not None:
        torch.save(updater.state_dict(), tmp / OPTIMIZER_FILE)
    torch.save(dict(rng_states) if rng_states is not None else capture_rng_states(), tmp / RNG_FILE)
    state = {"step": int(step), "version": int(policy.version),
             "sampler": sampler.state_dict() if sampler is not None else None,
             "extra": _jsonable(dict(extra or {})), "saved_at": time.time(), "format": 1}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in _checkpoints(run)[:-int(keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(run: Path) -> list[Path]:
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".tmp") and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len("step_"):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run folder, or None."""
    ckpts = _checkpoints(Path(run))
    return ckpts[-1] if ckpts else None


def load_training_checkpoint(ckpt: str | Path, policy: Any, updater: Any = None, sampler: Any = None,
                             restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into the given objects (any of ``updater``/``sampler`` may be None) and
    return its ``state.json`` (``step``, ``version``, ``sampler``, ``extra``).

    ``optimizer.pt`` and ``rng.pt`` are read with ``torch.load(..., weights_only=True)``: no
    pickled code runs. The policy's version comes from the checkpoint.
    """
    ckpt = Path(ckpt)
    state_path = ckpt / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE})")
    state = json.loads(state_path.read_text(encoding="utf-8"))
    policy.load_checkpoint(ckpt / POLICY_DIR)
    policy.version = int(state["version"])
    if updater is not None:
        opt = ckpt / OPTIMIZER_FILE
        if not opt.is_file():
            raise FileNotFoundError(f"{opt} missing: cannot restore the optimizer state")
        updater.load_state_dict(torch.load(opt, map_location=policy.device, weights_only=True))
    if sampler is not None and state.get("sampler") is not None:
        sampler.load_state_dict(state["sampler"])
    if restore_rng and (ckpt / RNG_FILE).is_file():
        restore_rng_states(torch.load(ckpt / RNG_FILE, map_location="cpu", weights_only=True))
    return state
