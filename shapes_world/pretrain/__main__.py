"""Rebuild the shapes-world models and their baseline metrics.

    python -m shapes_world.pretrain --data data/shapes --out models/shapes

Each model comes from a fixed seed; the run takes about 26 minutes on 2 CPU cores (with data
generation) and writes ``<out>/metrics.json``, which the committed models' numbers in
BENCHMARKS.md come from. ``--jobs 2`` trains stage 0 and the ITM in one process and the CLIPs and
the reader in another, side by side, each stage seeded as when run alone
(``stages.PARALLEL_GROUPS``); ``seconds.total`` in ``metrics.json`` is a full build's wall time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shapes_world.dataset import WORLD_FORMAT, ensure_world
from shapes_world.pretrain.stages import (CAPTIONER_CELL_LOSS, CAPTIONER_TOWER, CELL_LOSS, CELL_READOUT, MODELS,
                                          PARALLEL_GROUPS, READER_TOWER, REWARD_CLIP_NEGATIVES, SEEDS, STEPS, build,
                                          build_in_worker, models_read)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--out", default="models/shapes")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.01 for a smoke run)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training scenes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1,
                   help="stages trained side by side (%s), each process with threads/jobs threads; 1: one "
                        "after the other" % " | ".join("+".join(g) for g in PARALLEL_GROUPS))
    p.add_argument("--reward-clip-negatives", type=int, default=REWARD_CLIP_NEGATIVES,
                   help="binding negatives per training scene for the reward CLIP (NegCLIP; 0: plain CLIP); "
                        "the evaluator CLIP never gets them")
    p.add_argument("--vision-cell-loss", type=float, default=CELL_LOSS["vision"],
                   help="weight of the cell-label objective in stage 0 (clip.CellLabelLoss; 0: off)")
    p.add_argument("--reward-clip-cell-loss", type=float, default=CELL_LOSS["reward_clip"],
                   help="weight of the cell-label objective for the reward CLIP (0: off); the evaluator CLIP never gets it")
    p.add_argument("--captioner-cell-loss", type=float, default=CAPTIONER_CELL_LOSS,
                   help="weight of the cell-label objective on the captioner's query outputs (0: off)")
    for name in CELL_READOUT:
        p.add_argument(f"--{name.replace('_', '-')}-cell-readout", choices=("flat", "local"), default=CELL_READOUT[name],
                       help=f"how the cell-label objective reads the cells for {name} (clip.CellLabelLoss)")
    p.add_argument("--cell-background", action=argparse.BooleanOptionalAction, default=True,
                   help="the cell-label objective also asks every cell for the scene's background (clip.CellLabelLoss; "
                        "without it stage 0 dropped the background and the ITM could not learn ITC)")
    p.add_argument("--reader-tower", choices=("itm", "own"), default=READER_TOWER,
                   help="the cell reader reads the ITM's frozen stage-0 tower (itm) or trains its own on the cell "
                        "labels for reader_tower steps, then reader_tune more for reading alone (own)")
    p.add_argument("--captioner-tower", choices=("vision", "reader"), default=CAPTIONER_TOWER,
                   help="the captioner's frozen tower: stage 0's, shared with the ITM (vision), or the cell reader's "
                        "(reader; with --reader-tower own, a tower trained on the cell labels, taken before reader_tune)")
    p.add_argument("--steps", default="", metavar="NAME=N,...",
                   help=f"override step counts, e.g. vision=1200 (names: {','.join(STEPS)}); --scale applies after")
    p.add_argument("--only", default=",".join(MODELS),
                   help="comma-separated subset of %s to rebuild; the others are read from --out" % ",".join(MODELS))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in a.steps.split(",") if item)}
    except ValueError:
        p.error(f"--steps {a.steps!r}: expected NAME=N,... with whole numbers")
    if set(overrides) - set(STEPS):
        p.error(f"--steps: unknown name(s) {sorted(set(overrides) - set(STEPS))}; choose from {','.join(STEPS)}")
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be 1 or more")
    # reader_tune may be 0 (off); every other stage trains at least 2 steps
    steps = {k: (0 if not v and k == "reader_tune" else max(2, int(v * a.scale))) for k, v in (STEPS | overrides).items()}
    out = Path(a.out)
    only = set(filter(None, a.only.split(",")))  # "" re-evaluates the captioner only
    if not only <= set(MODELS):
        p.error(f"--only {a.only!r}: unknown model(s) {sorted(only - set(MODELS))}; choose from {MODELS}")
    # Checked before any training: the models not rebuilt are read from --out (the ITM for its
    # tower and Q-Former), and the captioner and the evaluator CLIP are evaluated at the end.
    missing = sorted(n for n in {"captioner", "eval_clip"} | models_read(a, only) if n not in only and not (out / n).is_dir())
    if missing:
        p.error(f"--only {a.only!r}: {out} has no {', '.join(missing)} to read; add them to --only or point --out "
                f"at a folder that holds them")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    # An existing world of the current format is used as it is (whatever its sizes); otherwise
    # the default one is made.
    meta = Path(a.data) / "meta.json"
    current = meta.exists() and json.loads(meta.read_text()).get("format") == WORLD_FORMAT
    root = Path(a.data) if current else ensure_world(a.data, seed=a.seed)
    old = out / "metrics.json"
    metrics: dict = json.loads(old.read_text()) if old.exists() and only != set(MODELS) else {}
    metrics |= {"steps": steps, "seeds": SEEDS, "world_seed": a.seed}
    if "reward_clip" in only:
        metrics["reward_clip_negatives"] = a.reward_clip_negatives
        metrics["reward_clip_cell_loss"] = a.reward_clip_cell_loss
        metrics["reward_clip_cell_readout"] = a.reward_clip_cell_readout
    if "vision" in only:
        metrics["vision_cell_loss"] = a.vision_cell_loss
        metrics["vision_cell_readout"] = a.vision_cell_readout
    if only & {"vision", "reward_clip"}:
        metrics["cell_background"] = a.cell_background
    if "captioner" in only:
        metrics["captioner_cell_loss"] = a.captioner_cell_loss
        metrics["captioner_tower"] = a.captioner_tower
    timings: dict = metrics.get("seconds", {})

    t_build = time.time()
    rest = set(only)
    waits = {"reader"} if a.reader_tower == "itm" else set()  # that reader reads the ITM's tower: it waits for the ITM
    groups = [g for g in (set(g) & only - waits for g in PARALLEL_GROUPS) if g] if a.jobs > 1 else []
    if len(groups) > 1:
        import concurrent.futures
        import multiprocessing

        threads = max(1, a.threads // a.jobs)
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
        with concurrent.futures.ProcessPoolExecutor(len(groups), mp_context=ctx) as pool:
            futures = [pool.submit(build_in_worker, vars(a), steps, sorted(g), str(root), str(out), threads)
                       for g in groups]
            for future in futures:  # a failed stage raises here, with its traceback
                m, t = future.result()
                metrics |= m
                timings |= t
        rest -= set().union(*groups)
    m, t = build(a, steps, rest, root, out)
    metrics |= m
    timings |= t
    wall = time.time() - t_build

    metrics["captioner_greedy_test"] = evaluate_saved_captioner(out / "captioner", out / "eval_clip", root / "test.parquet")
    print("captioner", metrics["captioner_greedy_test"], flush=True)
    metrics["captioner_grounding"] = captioner_grounding(out / "captioner", root / "test.parquet")
    print("captioner grounding", metrics["captioner_grounding"], flush=True)
    # A full build's total is its wall-clock time (stages side by side counted once); a partial
    # one (--only) adds its stages' times to those kept from the build it updates.
    timings["total"] = wall if only == set(MODELS) else sum(v for k, v in timings.items() if k in MODELS)
    metrics["seconds"] = timings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"wrote {out / 'metrics.json'} in {time.time() - t_start:.0f}s")


def evaluate_saved_captioner(captioner_dir: Path, evaluator_dir: Path, split: Path, max_new_tokens: int = 40) -> dict:
    """Greedy captions of a saved captioner on a split, scored by the evaluator CLIP."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from shapes_world.parse import attribute_scores
    from vlrm.data import open_split
    from vlrm.evaluate import ClipEvaluator, evaluate_captions

    model = Blip2ForConditionalGeneration.from_pretrained(str(captioner_dir)).eval()
    processor = Blip2Processor.from_pretrained(str(captioner_dir))
    ds = open_split(split)
    images, _, _ = ds.images(list(range(len(ds))))
    captions = []
    with torch.no_grad():
        for i in range(0, len(images), 200):
            pix = processor.image_processor(images[i:i + 200], return_tensors="pt").pixel_values
            ids = model.generate(pixel_values=pix, max_new_tokens=max_new_tokens, do_sample=False)
            captions += [c.strip() for c in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    from shapes_world.world import Scene

    truth = attribute_scores(captions, [Scene.from_dict(sc) for sc in scenes_of(ds)])
    result = evaluate_captions(captions, images, ClipEvaluator(str(evaluator_dir)), truth)
    result["examples"] = captions[:8]
    return result


def captioner_grounding(captioner_dir: Path, split: Path, images: int = 300) -> dict:
    """``shapes_world.ceiling.captioner_grounding`` on the split's first ``images`` images: per kind
    of word, how often the captioner, teacher-forced, prefers the true full description to the same
    one with that kind of word made wrong (0.5: it cannot tell), and how often, on the true
    description's track, the true word is its likeliest word of that kind (``next_word``)."""
    from shapes_world.ceiling import captioner_grounding as grounding
    from vlrm.data import open_split

    ds = open_split(split)
    n = min(images, len(ds))
    pil, _, _ = ds.images(list(range(n)))
    return grounding(captioner_dir, pil, scenes_of(ds)[:n])


def scenes_of(split) -> list[dict]:
    """The ground-truth scene dicts of a shapes-world split."""
    return [json.loads(s) for s in split.column("scene")]


if __name__ == "__main__":
    main()
