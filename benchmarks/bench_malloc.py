"""What a fixed glibc mmap threshold (``cluster.malloc_mmap_threshold_kb``) and heap trimming
(``cluster.trim_heap_every_s``) cost in speed and buy in memory, side by side in one run.

    python benchmarks/bench_malloc.py --steps 300 --thresholds 0 1024 128     # the table in BENCHMARKS.md

Each setting trains ``configs/shapes.yaml`` in ``--mode local`` (one process, the same three role
classes as the Ray actors, on-policy, so every setting takes the same steps with the same
captions) for ``--steps`` steps in a fresh process, one setting at a time. The table gives the
training throughput (samples/s, from ``summary.json``) and its ratio to glibc's defaults, the
process's private resident memory (``RssAnon``) after the warm-up step and at the end, and glibc's
free heap at the end. The soak (``benchmarks/soak.py``) shows the same settings over half an hour
with the actors apart.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
from actors.local import LocalEngine
from learner.trainer import run_training
from vlrm.config import load_config
from vlrm.memory import memory_now

cfg = load_config(sys.argv[1], sys.argv[2:])
marks = {}

class Probe(LocalEngine):
    def train(self, sampler, step, train_seconds, after_step, stop):
        def after(stats, at, *rest):
            after_step(stats, at, *rest)
            if at == 1:
                marks["warm"] = memory_now()
        return super().train(sampler, step, train_seconds, after, stop)

run = run_training(cfg, Probe)
summary = json.loads((run / "summary.json").read_text())
print(json.dumps({"summary": summary, "warm": marks["warm"], "end": memory_now()}))
"""


def measure(steps: int, threshold_kb: int, trim_s: float, out: Path) -> dict:
    name = f"malloc-{threshold_kb}-{trim_s:g}"
    args = ["--mode=local", f"--total_steps={steps}", "--eval.val_every=0", "--learner.checkpoint_every=0",
            "--eval.gallery_size=100", f"--output_dir={out}", f"--run_name={name}",
            f"--cluster.malloc_mmap_threshold_kb={threshold_kb}", f"--cluster.trim_heap_every_s={trim_s}"]
    proc = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "configs" / "shapes.yaml"), *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--thresholds", type=int, nargs="+", default=[0, 1024, 128], help="KiB; 0: glibc's own")
    p.add_argument("--trim-every", type=float, default=60.0, help="seconds, for the settings with trimming")
    a = p.parse_args()
    settings = [(0, 0.0)] + [(t, a.trim_every) for t in a.thresholds]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for threshold, trim in settings:
            r = measure(a.steps, threshold, trim, Path(tmp))
            rows.append((threshold, trim, r))
            print(f"[bench] threshold {threshold} KiB, trim every {trim:g} s: "
                  f"{r['summary']['samples_per_s']:.1f} samples/s", flush=True)
    base = rows[0][2]["summary"]["samples_per_s"]
    print(f"\n{platform.node()}, {a.steps} local-mode steps of configs/shapes.yaml per setting\n")
    print("| mmap threshold | trim every | samples/s | vs glibc defaults | RssAnon after step 1 (MiB) | "
          "RssAnon at the end | growth | glibc free heap at the end |")
    print("|---|---|---|---|---|---|---|---|")
    for threshold, trim, r in rows:
        s, w, e = r["summary"]["samples_per_s"], r["warm"]["anon_mib"], r["end"]["anon_mib"]
        print(f"| {f'{threshold} KiB' if threshold else 'glibc (rising)'} | {f'{trim:g} s' if trim else 'never'} "
              f"| {s:.1f} | {s / base:.2f}x | {w:,.0f} | {e:,.0f} | {e - w:+,.0f} | {r['end']['heap_free_mib']:,.0f} |")


if __name__ == "__main__":
    main()
