"""Rebuild the shapes-world models and their baseline metrics.

    python -m shapes_world.pretrain --data data/shapes --out models/shapes

Each model comes from a fixed seed; the run takes about 26 minutes on 2 CPU cores (with data
generation) and writes ``<out>/metrics.json``, which the committed models' numbers in
BENCHMARKS.md come from.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shapes_world.dataset import WORLD_FORMAT, ensure_world
from shapes_world.pretrain.blip2_io import save_blip2
from shapes_world.pretrain.common import load_split
from shapes_world.tokenizer import build_tokenizer
from shapes_world.world import counterfactual_texts

STEPS = {"reward_clip": 400, "eval_clip": 450, "vision": 500, "itm": 1600, "lm": 200, "captioner": 1600,
         "reader": 1500, "reader_tower": 1200}
# The captioner's language model learns to read the background from the queries only after some
# 150,000-200,000 captions (one in nine names it). At 800 steps of 128 whether it had was down to
# seed and float rounding (teacher-forced, the true background preferred for 0.99 of test images
# in one rebuild, 0.53-0.62 in five others), and RL from a captioner that cannot tell the
# background stalls (BENCHMARKS.md, pretrained models); at 1,600 steps two seeds gave 1.00 and 0.97.
# ``captioner_grounding`` in metrics.json reports it on every rebuild.
# The ITM trains on 64 images a step: 1,600 steps of 64 ranked better than 1,000 of 128 for less
# time (BENCHMARKS.md, pretrained models).
ITM_BATCH = 64
# Counterfactual ITM negatives per training scene (shapes_world.world.counterfactual_texts).
ITM_COUNTERFACTUALS = 4
# Binding negatives per scene for the reward CLIP (``--reward-clip-negatives``; NegCLIP: each
# training image must also prefer its alt-text to one with two objects' values traded).
REWARD_CLIP_NEGATIVES = 0
# Weight of the cell-label objective (``clip.CellLabelLoss``: every grid cell's shape, colour and
# size read from the tower's tokens) for stage 0 and for the reward CLIP; 0: contrastive and
# position losses only. The evaluator CLIP never gets it.
CELL_LOSS = {"vision": 0.0, "reward_clip": 0.0}
# Weight of the same objective on the captioner's Q-Former query outputs (read flat), beside the
# caption loss (``captioner.train_captioner``); 0: the caption loss alone, as BLIP-2.
CAPTIONER_CELL_LOSS = 0.0
# How it reads the cells (``CellLabelLoss.readout``): stage 0's tokens feed the Q-Former's
# attention, so each cell from its own patches; the reward CLIP is scored by its pooled output,
# so from all tokens. Either way, without ``--cell-background`` the ITM on stage 0 could not
# learn ITC (BENCHMARKS.md).
CELL_READOUT = {"vision": "local", "reward_clip": "flat"}
# Training scenes the cell reader's heads are fitted on (its tower stays frozen).
READER_SCENES = 10000
# The cell reader's tower: "itm", a frozen copy of the stage-0 tower the reward ITM and the
# captioner are built on, with linear heads fitted in 30-60 s; "own", a fresh tower of that class
# trained with its heads on the cell labels for ``reader_tower`` steps (about 5 minutes on 2
# cores), which reads shapes better (BENCHMARKS.md).
READER_TOWER = "itm"
# The captioner's frozen tower: "vision", the stage-0 tower the reward ITM reads too, as in BLIP-2;
# "reader", the cell reader's own tower (``--reader-tower own``), then trained on the cell labels
# also for a Q-Former (``reader.train_reader(for_qformer=True)``), so that the captioner sees every
# cell without stage 0 paying for the cell objective (the ITM, which reads stage 0, fell under 0.9
# on cell-trained towers). Such a build fits the 30 minutes, but its reader and captioner read
# shapes worse than a stage 0 trained on the cells for 1,200 steps (BENCHMARKS.md).
CAPTIONER_TOWER = "vision"
# "vision" is stage 0, the BLIP-2 vision tower; it is stored inside reward_itm and captioner.
# "reader" is that tower with linear heads that read each grid cell (shapes_world.reader), the
# verifier of the claims reward.
MODELS = ("reward_clip", "eval_clip", "vision", "reward_itm", "captioner", "reader")
SEEDS = {"reward_clip": 11, "eval_clip": 22, "vision": 55, "itm": 33, "captioner": 44, "reader": 66}


def clip_alt_text_metrics(model, test) -> dict:
    import open_clip

    from shapes_world.pretrain.clip import encode_images, encode_texts
    from vlrm.metrics import retrieval_recall

    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    txt = encode_texts(model, tok, [a[0] for a in test.alt_texts])
    img = encode_images(model, test.images)
    t2i = retrieval_recall(txt @ img.t(), torch.arange(len(img)))
    i2t = retrieval_recall(img @ txt.t(), torch.arange(len(img)))
    return {"text_to_image_r@1": t2i[1], "text_to_image_r@5": t2i[5], "image_to_text_r@1": i2t[1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--out", default="models/shapes")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.01 for a smoke run)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training scenes")
    p.add_argument("--threads", type=int, default=2)
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
                        "labels for reader_tower steps (own)")
    p.add_argument("--captioner-tower", choices=("vision", "reader"), default=CAPTIONER_TOWER,
                   help="the captioner's frozen tower: stage 0's, shared with the ITM (vision), or the cell reader's "
                        "(reader; with --reader-tower own, a tower trained on the cell labels)")
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
    steps = {k: max(2, int(v * a.scale)) for k, v in (STEPS | overrides).items()}
    out = Path(a.out)
    only = set(filter(None, a.only.split(",")))  # "" re-evaluates the captioner only
    if not only <= set(MODELS):
        p.error(f"--only: unknown model(s) {sorted(only - set(MODELS))}; choose from {MODELS}")
    # Checked before any training: the models not rebuilt are read from --out (the ITM for its
    # tower and Q-Former), and the captioner and the evaluator CLIP are evaluated at the end.
    reads_itm = bool(only & {"reward_itm", "captioner", "reader"}) and not only >= {"vision", "reward_itm"}
    reads_reader = "captioner" in only and a.captioner_tower == "reader"
    missing = sorted(n for n in {"captioner", "eval_clip"} | ({"reward_itm"} if reads_itm else set())
                     | ({"reader"} if reads_reader else set()) if n not in only and not (out / n).is_dir())
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
    train = load_split(root / "train.parquet", limit=a.train_limit)
    test = load_split(root / "test.parquet")
    tokenizer = build_tokenizer()
    old = out / "metrics.json"
    metrics: dict = json.loads(old.read_text()) if old.exists() and only != set(MODELS) else {}
    metrics |= {"steps": steps, "seeds": SEEDS, "world_seed": a.seed, "num_train": len(train.images)}
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

    from shapes_world.pretrain.clip import (CLIP_CONFIGS, CellLabelLoss, build_clip_with_positions, position_loss,
                                            remove_position_head, save_clip, train_clip)

    def objective(weight: float, readout: str, scenes: list[dict], build):
        """(build, aux_loss) for train_clip: the position loss, plus the cell-label one if weighted."""
        if not weight:
            return build, position_loss
        cells = CellLabelLoss(scenes, weight, readout=readout, background=a.cell_background)
        return (lambda cfg: cells.attach(build(cfg))), cells

    half = len(train.images) // 2
    for name, cfg_name, rows in (("reward_clip", "reward", slice(0, half)), ("eval_clip", "evaluator", slice(half, None))):
        if name not in only:
            continue
        t0 = time.time()
        subset = type(train)(train.images[rows], train.captions[rows], train.alt_texts[rows], train.scenes[rows])
        negatives = None
        if name == "reward_clip" and a.reward_clip_negatives:
            _, negatives = counterfactual_texts(subset.scenes, a.reward_clip_negatives, SEEDS[name], binding=True)
        # The position loss (as in stage 0) gets both CLIPs past 0.9 in 400-450 steps instead of 600.
        build, aux = objective(a.reward_clip_cell_loss if name == "reward_clip" else 0.0, a.reward_clip_cell_readout,
                               subset.scenes, build_clip_with_positions)
        model = train_clip(subset, CLIP_CONFIGS[cfg_name], seed=SEEDS[name], steps=steps[name], name=name,
                           build=build, aux_loss=aux, hard_negatives=negatives)
        remove_position_head(model)
        save_clip(model, CLIP_CONFIGS[cfg_name], out / name,
                  extra={"trained_on": f"train scenes [{rows.start}, {rows.stop or len(train.images)})"})
        metrics[name] = clip_alt_text_metrics(model, test)
        timings[name] = time.time() - t0
        print(name, metrics[name], flush=True)

    from transformers import Blip2ForImageTextRetrieval

    from shapes_world.pretrain.itm import itm_rank_accuracy, train_itm
    from shapes_world.pretrain.vision import STAGE0_CLIP, build_stage0

    # The saved ITM model holds the stage-0 tower and the stage-1 Q-Former: read once, if needed.
    saved_itm = (Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm"))
                 if reads_itm else None)
    if "vision" in only:
        t0 = time.time()
        build, aux = objective(a.vision_cell_loss, a.vision_cell_readout, train.scenes, build_stage0)
        stage0 = train_clip(train, STAGE0_CLIP, seed=SEEDS["vision"], steps=steps["vision"], name="vision", build=build,
                            aux_loss=aux)
        vision = stage0.visual.model
        metrics["vision"] = clip_alt_text_metrics(stage0, test)
        timings["vision"] = time.time() - t0
        print("vision", metrics["vision"], flush=True)
    elif saved_itm is not None:
        vision = saved_itm.vision_model

    if "reward_itm" in only:
        t0 = time.time()
        itm = train_itm(train, tokenizer, vision, seed=SEEDS["itm"], steps=steps["itm"], batch_size=ITM_BATCH,
                        counterfactuals=ITM_COUNTERFACTUALS)
        save_blip2(itm, tokenizer, out / "reward_itm")
        metrics["reward_itm"] = itm_rank_accuracy(itm, tokenizer, test.images, [a[0] for a in test.alt_texts])
        timings["reward_itm"] = time.time() - t0
        print("reward_itm", metrics["reward_itm"], flush=True)
    else:
        itm = saved_itm

    if "reader" in only:
        import copy

        from shapes_world.reader import fit_reader, train_reader

        t0 = time.time()
        metrics["reader_tower"] = a.reader_tower
        if a.reader_tower == "own":
            reader = train_reader(train.images, train.scenes, steps=steps["reader_tower"], seed=SEEDS["reader"],
                                  for_qformer=a.captioner_tower == "reader")
        else:  # a copy of the ITM's (stage-0) tower: the reward ITM and the captioner are built on it
            reader = fit_reader(copy.deepcopy(itm.vision_model), train.images[:READER_SCENES],
                                train.scenes[:READER_SCENES], steps=steps["reader"], seed=SEEDS["reader"])
        metrics["reader"] = reader.accuracy(test.images, test.scenes)
        reader.info["test_accuracy"] = metrics["reader"]
        reader.save(out / "reader")
        timings["reader"] = time.time() - t0
        print("reader", metrics["reader"], flush=True)
    elif reads_reader:
        from shapes_world.reader import CellReader

        reader = CellReader.load(out / "reader")

    from shapes_world.pretrain.captioner import train_captioner

    if "captioner" in only:
        t0 = time.time()
        tower = reader.tower if a.captioner_tower == "reader" else vision
        captioner = train_captioner(train, tokenizer, tower, itm, seed=SEEDS["captioner"], lm_steps=steps["lm"],
                                    steps=steps["captioner"], cell_loss_weight=a.captioner_cell_loss)
        save_blip2(captioner, tokenizer, out / "captioner")
        timings["captioner"] = time.time() - t0

    metrics["captioner_greedy_test"] = evaluate_saved_captioner(out / "captioner", out / "eval_clip", root / "test.parquet")
    print("captioner", metrics["captioner_greedy_test"], flush=True)
    metrics["captioner_grounding"] = captioner_grounding(out / "captioner", root / "test.parquet")
    print("captioner grounding", metrics["captioner_grounding"], flush=True)
    timings["total"] = sum(v for k, v in timings.items() if k in MODELS and v is not None)
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
