"""Soak: the Ray system at full actor count for a long run, with each role's memory and the object
store's use sampled over time, to show that nothing grows without bound.

    python benchmarks/soak.py --minutes 30 --every 120          # the table in RELIABILITY.md

It trains ``configs/shapes.yaml`` (async, 2 rollout + 1 reward actors and the learner; override
with ``--set key=value``) for ``--minutes`` (``time_budget_s``; ``total_steps`` is lifted), and every
``--every`` seconds records each actor's memory (its ``memory()``: resident memory and its private
part ``anon``, the interpreter's allocated blocks, glibc's used and free heap; :mod:`vlrm.memory`)
and the object store's use (Ray's ``memory_summary``). It prints one row per sample and a verdict
per series: the growth from the first sample after warm-up (the second) to the last, and the
slope of a least-squares line over those samples. The actors hand their free heap pages back
every ``cluster.trim_heap_every_s`` (``--set cluster.trim_heap_every_s=0`` to see them kept).
The accounting identity of the run is printed at the end, as in every run.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def object_store_mib() -> float:
    """Bytes in the object store now, in MiB (Ray's own summary of this node's store)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", text)
    return float(m.group(1)) if m else float("nan")


def slope_per_10min(ts: list[float], ys: list[float]) -> float:
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = sum(ts) / n, sum(ys) / n
    den = sum((t - mt) ** 2 for t in ts)
    return 600.0 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / den if den else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--every", type=float, default=120.0, help="seconds between samples")
    p.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", default=str(ROOT / "runs"))
    p.add_argument("--trim-at-sample", action="store_true",
                   help="after each sample, hand each actor's free C heap pages back and record its RSS after")
    a = p.parse_args()
    import ray

    from actors.driver import DistributedEngine
    from learner.trainer import run_training
    from vlrm.config import load_config

    overrides = list(a.set) + [f"time_budget_s={a.minutes * 60}", "total_steps=100000000", f"output_dir={a.out}",
                               "run_name=soak", "eval.val_every=0"]
    cfg = load_config(a.config, overrides)
    samples: list[dict] = []
    details: dict[str, list[dict]] = defaultdict(list)
    t_start = time.monotonic()
    next_at = [0.0]

    def sample(engine, step: int, stats: dict) -> None:
        now = time.monotonic() - t_start
        if now < next_at[0]:
            return
        next_at[0] = now + a.every
        actors = {"learner": engine.learner} | {f"rollout-{i}": r for i, r in enumerate(engine.rollouts)} | {
            f"reward-{j}": r for j, r in enumerate(engine.rewards)}
        row = {"t_min": now / 60, "step": step}
        for name, actor in actors.items():
            try:
                mem = ray.get(actor.memory.remote(trim=a.trim_at_sample), timeout=30)
            except Exception:  # restarting: no sample this time
                mem = {"before": {}, "after": None}
            row[name] = mem["before"].get("rss_mib") or float("nan")
            row[f"{name} anon"] = mem["before"].get("anon_mib") or float("nan")
            rest = {k: v for k, v in mem["before"].items() if k not in ("rss_mib", "anon_mib")}
            details[name].append({"t_min": now / 60, **rest,
                                  "rss_after_trim_mib": (mem["after"] or {}).get("rss_mib")})
        row["object_store"] = object_store_mib()
        samples.append(row)
        print("[soak] " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)

    run_training(cfg, DistributedEngine, on_step=sample)
    keys = [k for k in samples[0] if k not in ("t_min", "step")] if samples else []
    print(f"\n{'t (min)':>8s} {'step':>7s} " + " ".join(f"{k:>14s}" for k in keys) + "   (MiB)")
    for r in samples:
        print(f"{r['t_min']:8.1f} {r['step']:7d} " + " ".join(f"{r[k]:14.1f}" for k in keys))
    steady = samples[1:] if len(samples) > 2 else samples
    print("\ngrowth after warm-up (second sample to last) and least-squares slope:")
    for k in keys:
        ys = [r[k] for r in steady]
        ts = [r["t_min"] * 60 for r in steady]
        print(f"  {k:16s} {ys[-1] - ys[0]:+8.1f} MiB   {slope_per_10min(ts, ys):+7.2f} MiB per 10 min")
    print("\nwhat each actor holds (python_blocks: the interpreter's objects; heap_used/heap_free: glibc's "
          "allocated and free MiB; rss_after_trim: with --trim-at-sample):")
    for name, rows in details.items():
        for r in rows:
            print(f"  {name:12s} {r['t_min']:6.1f} min  " + "  ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k != "t_min"))
    (Path(a.out) / "soak_memory.json").write_text(json.dumps({"samples": samples, "details": details}, indent=1))


if __name__ == "__main__":
    main()
