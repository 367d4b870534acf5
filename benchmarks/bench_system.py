"""Benchmark of the Ray actor-learner system on the shapes world, in one run (prints one table).

- samples/s of ``async`` vs ``sync`` mode with the same actors (``--rollout-actors`` rollout, ``--reward-actors``
  reward, 1 learner) over the same ``--steps`` learner steps (the Ray engine; periodic validation off,
  a tiny before/after evaluation gallery, no intermediate checkpoints);
- each stage alone, with the same batch sizes: generation (rollout actors), scoring (one reward actor),
  the learner update (one batch of ``images x k`` samples per step, the updates queued back to back,
  as ``learner.prefetch`` queues them in async mode);
- pipeline efficiency = async samples/s / samples/s of the slowest stage alone (goal >= 0.85), where a
  stage runs with as many actors as the system gives it, all working together and nothing else running
  (the rollout stage is measured with its N actors generating at once, so the shared cores are counted;
  a stage with several reward actors is one actor's rate times their number); and the shared-CPU
  ceiling = cores / (actor CPU-seconds per sample, summed over the stages);
- samples/s vs the number of rollout actors (1 .. ``--max-actors``): async system and generation alone;
- weight-push latency (learner publish -> rollout actor has swapped the weights in), as recorded by the
  system in ``accounting.json`` (async and sync runs) and for idle actors;
- peak memory per role: each actor's own high-water marks (RSS, and GPU memory allocated by torch on a
  GPU), as the system records them in ``accounting.json`` (``peak_memory_mb``).

Samples are sampled captions (rollouts). "steady" rates leave out the first fifth of the steps (start-up,
pipeline fill); "overall" is ``summary.json``'s samples/s over all training time. Without ``--steps``, the
stages alone are measured first and the number of steps (the same for every run) is chosen so that the
sync run trains for about ``--run-seconds``; each run is then capped at 2x that (``time_budget_s``).

    .venv/bin/python benchmarks/bench_system.py --run-seconds 100 --images 16 --k 4 --max-new-tokens 40
    .venv/bin/python benchmarks/bench_system.py --steps 2 --images 2 --k 2 --max-new-tokens 6 --repeats 2  # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false"),
               ("RAY_DEDUP_LOGS", "0")):
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from vlrm.accounting import summarize  # noqa: E402
from vlrm.config import RunConfig, load_config, resolve  # noqa: E402


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def make_config(a: argparse.Namespace, mode: str, rollout_actors: int, name: str, out: Path,
                extra: tuple[str, ...] = ()) -> RunConfig:
    """The shapes config with the benchmark's sizes; every role gets ``--threads-per-actor`` CPUs
    (= torch threads in the actor)."""
    t = a.threads_per_actor
    over = [f"mode={mode}", f"run_name={name}", f"output_dir={out}", f"total_steps={a.steps}",
            f"rollout.num_actors={rollout_actors}", f"reward.num_actors={a.reward_actors}",
            f"rollout.images_per_batch={a.images}", f"rollout.samples_per_image={a.k}",
            f"rollout.max_new_tokens={a.max_new_tokens}", f"eval.max_new_tokens={a.max_new_tokens}",
            f"rollout.num_cpus={t}", f"reward.num_cpus={t}", f"learner.num_cpus={t}",
            "learner.checkpoint_every=0", "learner.log_every=1", "eval.val_every=0",
            f"eval.gallery_size={a.eval_gallery}", "cluster.include_dashboard=false"]
    if a.model:
        over.append(f"policy.model_path={a.model}")
    if a.run_budget_s:
        over.append(f"time_budget_s={a.run_budget_s}")
    return load_config(a.config, over + list(a.set) + list(extra))


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def steady_rate(metrics_path: Path) -> float | None:
    """samples/s over the steps after the first fifth (from ``metrics.jsonl``)."""
    recs = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "samples" in r and "time/train_s" in r]
    if len(recs) < 2:
        return None
    w = max(1, len(recs) // 5) - 1
    ds = recs[-1]["samples"] - recs[w]["samples"]
    dt = recs[-1]["time/train_s"] - recs[w]["time/train_s"]
    return ds / dt if dt > 0 else None


def fmt_latency(s: dict | None) -> tuple[str, str]:
    """(mean, "p50 / p90 / max (n)") of a latency summary in ms."""
    if not s:
        return "n/a", ""
    return f"{s['mean'] * 1e3:.0f} ms", f"p50 {s['p50'] * 1e3:.0f} / p90 {s['p90'] * 1e3:.0f} / max {s['max'] * 1e3:.0f} ms (n={s['n']})"


# --------------------------------------------------------------------------------------
# Stages alone
# --------------------------------------------------------------------------------------


class Stages:
    """The three roles' actors created by hand (no driver loop, no queue), to time each stage alone."""

    def __init__(self, cfg: RunConfig, max_actors: int):
        import ray

        from actors.rollout import RolloutActor, rollout_actor_options
        from learner.actor import LearnerActor, learner_actor_options
        from rewards.actor import RewardActor, reward_actor_options
        from vlrm.data import open_source

        self.cfg = cfg
        lcfg = resolve(cfg)
        lcfg.learner.max_policy_lag = 10**6  # every timed update learns from rows sampled at version 0
        self.rollouts = [RolloutActor.options(**rollout_actor_options(cfg)).remote(cfg, f"rollout-{i}", None,
                                                                                  fetch_weights=False)
                         for i in range(max_actors)]
        rcfg = resolve(cfg)
        rcfg.reward.batch_wait_s = 0.0  # one batch per model call, no merge window: the actor's own speed
        self.reward = RewardActor.options(**reward_actor_options(cfg)).remote(rcfg, "reward-0")
        self.learner = LearnerActor.options(**learner_actor_options(cfg)).remote(lcfg, None)
        infos = ray.get([a.info.remote() for a in self.rollouts] + [self.reward.info.remote(), self.learner.info.remote()])
        self.rollout_pids = [int(i["pid"]) for i in infos[:max_actors]]
        self.reward_pid, self.learner_pid = int(infos[-2]["pid"]), int(infos[-1]["pid"])
        self.rng = np.random.default_rng(0)
        self.num_rows = len(open_source(cfg.data).split(cfg.data.train_split))
        self.counter = 0
        warm = [self._gen(a) for a in self.rollouts]  # warm-up: one batch per actor
        ray.get([m for _, m in warm])
        self.batches: list = [d for d, _ in warm]  # rollout batch refs, all distinct (fresh batch ids)

    def _gen(self, actor):
        self.counter += 1
        rows = self.rng.choice(self.num_rows, self.cfg.rollout.images_per_batch, replace=False).tolist()
        return actor.generate.remote(rows, f"bench-g{self.counter:06d}")

    def kill(self) -> None:
        import ray

        for a in self.rollouts + [self.reward, self.learner]:
            ray.kill(a, no_restart=True)
        self.batches = []


def bench_generation(st: Stages, n: int, repeats: int) -> dict:
    """``n`` rollout actors generating at once, each ``repeats`` batches back to back (as in async
    mode: one batch in flight per actor, the next submitted when one returns)."""
    import ray

    actors, pids = st.rollouts[:n], st.rollout_pids[:n]
    left = [repeats] * n
    pending: dict = {}

    def submit(i: int) -> None:
        d, m = st._gen(actors[i])
        pending[m] = (i, d)
        left[i] -= 1

    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    for i in range(n):
        submit(i)
    rows = 0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i, d = pending.pop(done[0])
        rows += ray.get(done[0])["rows"]
        st.batches.append(d)
        if left[i] > 0:
            submit(i)
    wall = time.perf_counter() - t0
    return {"samples_per_s": rows / wall, "cpu_s_per_sample": (cpu_seconds(pids) - cpu0) / max(rows, 1),
            "rows": rows, "seconds": wall}


def bench_scoring(st: Stages, repeats: int) -> tuple[dict, list]:
    """One reward actor scoring distinct rollout batches one at a time, back to back, with
    ``reward.batch_wait_s=0`` (the merge window is idle time, not work; in the system, requests
    arriving during a model call are merged into the next one without waiting). Returns the rates
    and the scored batch refs."""
    import ray

    batches = st.batches[: repeats + 1]
    if len(batches) < repeats + 1:
        raise RuntimeError("not enough distinct rollout batches for the scoring benchmark")
    scored, rows, wall, cpu = [], 0, 0.0, 0.0
    for j, b in enumerate(batches):
        c0, t0 = cpu_seconds([st.reward_pid]), time.perf_counter()
        d, m = st.reward.score.remote(b)
        meta = ray.get(m)
        dt, dc = time.perf_counter() - t0, cpu_seconds([st.reward_pid]) - c0
        scored.append(d)
        if j > 0:  # the first call is a warm-up
            rows, wall, cpu = rows + meta["rows"], wall + dt, cpu + dc
    return {"samples_per_s": rows / wall, "cpu_s_per_sample": cpu / max(rows, 1), "rows": rows,
            "seconds": wall}, scored


def bench_learner(st: Stages, scored: list, repeats: int, push_to: int) -> tuple[dict, dict]:
    """The learner alone, fed as async mode feeds it: after one warm-up update (optimizer state),
    ``repeats`` updates of one scored batch each are submitted at once, so each is queued behind
    the running one (``learner.prefetch``) and no round trip through the driver sits between
    them; update + publish timed from the first submission to the last result. Then the weight
    push, ``repeats`` times: the learner publishes and ``push_to`` idle rollout actors swap the
    weights in (publish -> every actor swapped)."""
    import ray

    batches = scored[: repeats + 1]
    if len(batches) < repeats + 1:
        raise RuntimeError("not enough scored batches for the learner benchmark")
    ray.get(st.learner.update.remote([batches[0]]))
    c0, t0 = cpu_seconds([st.learner_pid]), time.perf_counter()
    results = ray.get([st.learner.update.remote([ref]) for ref in batches[1:]])
    wall, cpu = time.perf_counter() - t0, cpu_seconds([st.learner_pid]) - c0
    rows = sum(int(r.get("consumed", 0)) + int(r.get("dropped_for_lag", 0)) for r in results)
    latencies, loads = [], []
    for _ in range(repeats):
        wrefs, version = ray.get(st.learner.publish.remote())
        wref = wrefs["policy"]
        published = ray.get(st.learner.get_weights_info.remote())[2]
        acks = ray.get([a.set_weights.remote(wref, version, published) for a in st.rollouts[:push_to]])
        latencies.append(max(float(x["latency_s"]) for x in acks))
        loads += [float(x["load_s"]) for x in acks]
    return ({"samples_per_s": rows / wall, "cpu_s_per_sample": cpu / max(rows, 1), "rows": rows, "seconds": wall},
            {"latency": summarize(latencies), "load": summarize(loads)})


# --------------------------------------------------------------------------------------
# The system
# --------------------------------------------------------------------------------------


def pinned_overrides() -> tuple[str, ...]:
    """The learner on the last core of its own, every other role on the remaining cores."""
    cores = sorted(os.sched_getaffinity(0))
    rest = ",".join(map(str, cores[:-1]))
    return (f"learner.cpu_affinity=[{cores[-1]}]", f"rollout.cpu_affinity=[{rest}]", f"reward.cpu_affinity=[{rest}]")


def run_system(a: argparse.Namespace, mode: str, rollout_actors: int, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """One Ray run; its numbers from ``summary.json``, ``accounting.json`` and
    ``metrics.jsonl``. ``extra``: config overrides of this run only."""
    import launch
    from learner.trainer import run_training

    name = f"bench-{mode}-{rollout_actors}r{'-pinned' if extra else ''}-{time.strftime('%H%M%S')}"
    cfg = make_config(a, mode, rollout_actors, name, out, extra)
    log = out / f"{name}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            run = run_training(cfg, launch.load_target(launch.ENGINES[cfg.mode]))
    except BaseException:
        print(f"[bench] {mode} run with {rollout_actors} rollout actors failed; its log ({log}) ends with:\n"
              + "\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr, flush=True)
        raise
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    acc = json.loads((run / "accounting.json").read_text())
    lags = [json.loads(x).get("policy_lag") for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lags = [x for x in lags if x is not None]
    r = {"mode": mode, "rollout_actors": rollout_actors, "steps": summary["steps"],
         "train_s": summary["train_seconds"], "wall_s": wall, "overall": summary["samples_per_s"],
         "steady": steady_rate(run / "metrics.jsonl") or summary["samples_per_s"],
         "dropped": acc["dropped_for_lag"], "discarded": acc["discarded_at_stop"],
         "identity": bool(acc["identity_holds"]), "push": acc.get("weight_push_latency_s"),
         "load": acc.get("weight_load_s"), "memory": acc["peak_memory_mb"],
         "lag": float(np.mean(lags)) if lags else 0.0, "dir": run, "overrides": extra}
    print(f"[bench] {mode:5s} {rollout_actors} rollout actor(s){' pinned' if extra else ''}: {r['steps']} steps, {r['steady']:.2f} samples/s "
          f"steady, {r['overall']:.2f} overall; {wall:.0f}s wall", file=sys.stderr, flush=True)
    time.sleep(1.0)  # let the killed actors' processes exit before the next run
    return r


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def auto_steps(a: argparse.Namespace, gen: dict, score: dict, learn: dict, push: dict) -> tuple[int, float]:
    """Steps for the sync run to train about ``--run-seconds``: a sync step generates (the rollout
    actors together), then scores, then learns, then pushes; returns (steps, predicted s/step)."""
    per_step = a.images * a.k
    step_s = (per_step / gen[a.rollout_actors]["samples_per_s"]
              + per_step / (score["samples_per_s"] * a.reward_actors)
              + per_step / learn["samples_per_s"] + ((push.get("latency") or {}).get("mean") or 0.0))
    return max(5, round(a.run_seconds / step_s)), step_s


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes.yaml")
    p.add_argument("--model", default=None, help="policy.model_path (default: the config's)")
    p.add_argument("--steps", type=int, default=None,
                   help="learner steps per system run (default: enough for the sync run to take --run-seconds, "
                        "predicted from the stages alone)")
    p.add_argument("--run-seconds", type=float, default=100.0,
                   help="target training time of the sync run when --steps is not given")
    p.add_argument("--images", type=int, default=16, help="rollout.images_per_batch")
    p.add_argument("--k", type=int, default=4, help="rollout.samples_per_image")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--rollout-actors", type=int, default=2, help="rollout actors of the async-vs-sync comparison")
    p.add_argument("--reward-actors", type=int, default=1)
    p.add_argument("--max-actors", type=int, default=3, help="throughput vs rollout actors: 1 .. this many")
    p.add_argument("--threads-per-actor", type=int, default=1, help="num_cpus (= torch threads) of every actor")
    p.add_argument("--repeats", type=int, default=4, help="timed batches per actor for the stages alone")
    p.add_argument("--eval-gallery", type=int, default=8, help="eval.gallery_size of the before/after evaluation")
    p.add_argument("--run-budget-s", type=float, default=None,
                   help="time_budget_s cap of each system run (default: none with --steps, 2 x --run-seconds without)")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray logical CPUs (default: max(cores, what actors ask))")
    p.add_argument("--pin", action="store_true",
                   help="also an async run with the learner pinned to a core of its own, the other roles to the rest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--keep", action="store_true", help="keep the run folders (default: a temp dir, removed)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import ray

    a = parse_args(argv)
    os.chdir(ROOT)
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    out = Path(tempfile.mkdtemp(prefix="bench_system_"))
    counts = sorted(set(range(1, a.max_actors + 1)) | {a.rollout_actors})
    auto = a.steps is None
    if auto:
        a.steps = 1  # placeholder until the stages alone are measured
    base = make_config(a, "async", max(counts), "bench-stages", out)
    need = (max(counts) + a.reward_actors + 1) * a.threads_per_actor
    num_cpus = a.num_cpus or max(os.cpu_count() or 1, need)
    ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=base.cluster.namespace, log_to_driver=False)
    t_start = time.perf_counter()
    try:
        from actors.cluster import localize_paths

        base = localize_paths(base)
        # ---- stages alone
        print(f"[bench] stages alone ({max(counts)} rollout actors, 1 reward actor, 1 learner)", file=sys.stderr,
              flush=True)
        st, scored = Stages(base, max(counts)), []
        try:
            gen = {n: bench_generation(st, n, a.repeats) for n in counts}
            score, scored = bench_scoring(st, a.repeats)
            learn, push_idle = bench_learner(st, scored, a.repeats, a.rollout_actors)
        finally:
            st.kill()
            scored.clear()  # release the batches in the object store
            time.sleep(1.0)
        if auto:
            a.steps, step_s = auto_steps(a, gen, score, learn, push_idle)
            a.run_budget_s = a.run_budget_s or 2 * a.run_seconds
            print(f"[bench] {a.steps} steps per run (sync step predicted {step_s:.2f}s from the stages alone; "
                  f"cap {a.run_budget_s:.0f}s per run)", file=sys.stderr, flush=True)
        # ---- the system: sync and async with the same actors, then async with 1 .. max actors
        sync = run_system(a, "sync", a.rollout_actors, out)
        runs = {a.rollout_actors: run_system(a, "async", a.rollout_actors, out)}
        for n in counts:
            if n not in runs:
                runs[n] = run_system(a, "async", n, out)
        asy = runs[a.rollout_actors]
        pinned = run_system(a, "async", a.rollout_actors, out, pinned_overrides()) if a.pin else None
        report(a, command, num_cpus, gen, score, learn, push_idle, sync, asy, runs,
               time.perf_counter() - t_start, auto, pinned)
    finally:
        ray.shutdown()
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
        else:
            print(f"[bench] run folders kept in {out}", file=sys.stderr)


def report(a, command, num_cpus, gen, score, learn, push_idle, sync, asy, runs, total_s, auto=False,
           pinned: dict | None = None) -> None:
    import ray

    n, nr = a.rollout_actors, a.reward_actors
    per_step = a.images * a.k
    rows: list[tuple[str, str, str]] = []

    def section(title: str) -> None:
        rows.append((f"-- {title}", "", ""))

    def row(name: str, value: str, note: str = "", more: str = "") -> None:
        rows.append((name, value, note + more))

    section(f"system: {n} rollout + {nr} reward actors + 1 learner, {a.steps} steps of {per_step} samples")
    for r in (sync, asy):
        row(f"{r['mode']} samples/s (steady / overall)", f"{r['steady']:.2f} / {r['overall']:.2f}",
            f"{r['steps']} steps in {r['train_s']:.1f}s train; policy lag {r['lag']:.2f}; "
            f"dropped for lag {r['dropped']}")
    row("async / sync", f"{asy['steady'] / sync['steady']:.2f}x", "steady rates")

    section("stages alone (same batch: one batch = images x k samples; nothing else running)")
    row("generation, 1 rollout actor", f"{gen[1]['samples_per_s']:.2f}",
        f"samples/s; {gen[1]['cpu_s_per_sample'] * 1e3:.1f} CPU-ms/sample")
    gen_stage = gen[n]["samples_per_s"]
    if n > 1:
        row(f"generation, {n} rollout actors at once", f"{gen_stage:.2f}",
            f"samples/s ({gen_stage / gen[1]['samples_per_s']:.2f}x one actor; linear would be {n}x)")
    row("scoring, 1 reward actor", f"{score['samples_per_s']:.2f}",
        f"samples/s; {score['cpu_s_per_sample'] * 1e3:.1f} CPU-ms/sample; one batch per call, no merge wait")
    score_stage = score["samples_per_s"] * nr
    if nr > 1:
        row(f"scoring, {nr} reward actors", f"{score_stage:.2f}", "samples/s (one actor's rate x number: not measured)")
    row("learner update (+ publish), 1 learner", f"{learn['samples_per_s']:.2f}",
        f"samples/s; {learn['cpu_s_per_sample'] * 1e3:.1f} CPU-ms/sample; one batch per step, queued back to back")
    stages = {"generation": gen_stage, "scoring": score_stage, "learner": learn["samples_per_s"]}
    slowest = min(stages, key=stages.get)
    eff = asy["steady"] / stages[slowest]
    row("slowest stage alone", f"{stages[slowest]:.2f}", f"samples/s: {slowest} (each stage with all its actors)")
    row("pipeline efficiency = async / slowest", f"{eff:.2f}", f"goal >= 0.85 ({'met' if eff >= 0.85 else 'not met'})")
    if pinned:
        eff_p = pinned["steady"] / stages[slowest]
        row("async, learner pinned to a core of its own", f"{pinned['steady']:.2f}",
            f"samples/s ({' '.join(pinned['overrides'])}); policy lag {pinned['lag']:.2f}; "
            f"dropped for lag {pinned['dropped']}")
        row("pipeline efficiency, pinned", f"{eff_p:.2f}", f"goal >= 0.85 ({'met' if eff_p >= 0.85 else 'not met'})")
    cpu_per_sample = gen[1]["cpu_s_per_sample"] + score["cpu_s_per_sample"] + learn["cpu_s_per_sample"]
    cores = os.cpu_count() or 1
    ceiling = cores / cpu_per_sample
    row("shared-CPU ceiling", f"{ceiling:.2f}", f"samples/s = {cores} cores / {cpu_per_sample * 1e3:.1f} "
        f"actor CPU-ms per sample (all stages); async reaches {asy['steady'] / ceiling:.2f} of it")

    section("throughput vs rollout actors (async: 1 reward actor, 1 learner)")
    for k in sorted(runs):
        r = runs[k]
        row(f"{k} rollout actor{'s' if k > 1 else ''}", f"{r['steady']:.2f}",
            f"samples/s async (overall {r['overall']:.2f}); generation alone {gen[k]['samples_per_s']:.2f}; "
            f"lag {r['lag']:.2f}")

    section("weight-push latency, mean (learner publish -> rollout actor has swapped the weights in)")
    row("async run", *fmt_latency(asy["push"]), "; an actor mid-batch swaps after it")
    row("sync run", *fmt_latency(sync["push"]), "; actors idle")
    row(f"isolated, {n} idle actors", *fmt_latency(push_idle["latency"]), "; slowest actor per push")
    row("  of which loading into the model", *fmt_latency(asy["load"]), "; async run")

    section(f"peak memory per role (each actor's high-water mark, async run with {n} rollout actors)")
    for role in ("rollout", "reward", "learner"):
        m, sm = asy["memory"][role], sync["memory"][role]
        gpu = f"; GPU {m['gpu']:.0f} MiB (sync run {sm['gpu']:.0f})" if m["gpu"] is not None else ""
        row(f"{role}", f"{m['rss']:.0f} MiB", f"RSS, max over {m['actors']} actor(s); sync run {sm['rss']:.0f} MiB{gpu}")
    row("driver", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        "this process (ru_maxrss, whole benchmark)")

    section("accounting")
    all_runs = [sync] + list(runs.values()) + ([pinned] if pinned else [])
    row("generated == scored == consumed + dropped + discarded",
        "holds" if all(r["identity"] for r in all_runs) else "BROKEN", f"in all {len(all_runs)} runs")

    mem = psutil.virtual_memory().total / 2**30
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"(os.cpu_count), {mem:.0f} GiB RAM; torch {torch.__version__}, {a.threads_per_actor} torch thread(s) "
          f"per actor (num_cpus per role), Ray {ray.__version__} with {num_cpus} logical CPUs")
    print(f"command: {command}")
    print(f"setup: {a.config}, policy {make_config(a, 'async', n, 'x', Path('.')).policy.model_path}; "
          f"{a.images} images x k={a.k} = {per_step} samples per batch/step, max_new_tokens {a.max_new_tokens}; "
          f"{a.repeats} timed batches per actor for the stages alone; {a.steps} steps per run"
          f"{' (chosen for a sync run of about %.0fs)' % a.run_seconds if auto else ''}"
          f"{'; time_budget_s %.0f per run' % a.run_budget_s if a.run_budget_s else ''}; "
          f"benchmark took {total_s / 60:.1f} min")
    w0 = max(len(r[0]) for r in rows if not r[0].startswith("-- "))
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measure':{w0}s}  {'value':>{w1}s}  note")
    for name, value, note in rows:
        if name.startswith("-- "):
            print(name)
        else:
            print(f"{name:{w0}s}  {value:>{w1}s}  {note}")


if __name__ == "__main__":
    main()
