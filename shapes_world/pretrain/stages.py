"""The pretraining stages: each model of the shapes world trained from its fixed seed, saved,
and measured (``build``); the command in ``__main__`` runs them, one after the other or, with
``--jobs``, two groups side by side in their own processes (this module is what they import)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from shapes_world.pretrain.blip2_io import save_blip2
from shapes_world.pretrain.common import load_split
from shapes_world.tokenizer import build_tokenizer
from shapes_world.world import counterfactual_texts

STEPS = {"reward_clip": 400, "eval_clip": 450, "vision": 500, "itm": 1600, "lm": 200, "captioner": 1600,
         "reader": 1500, "reader_tower": 1200, "reader_tune": 0}
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
# ``reader_tune`` steps: a reader with its own tower is then trained on for reading alone
# (``reader.tune_reader``). With ``--captioner-tower reader`` the captioner keeps the tower as it
# was before (saved in ``<out>/captioner_tower``): trained for a Q-Former, it serves the captioner,
# and tuned, the reader, each better than one tower does both (BENCHMARKS.md).
# The captioner's frozen tower: "vision", the stage-0 tower the reward ITM reads too, as in BLIP-2;
# "reader", the cell reader's own tower (``--reader-tower own``), then trained on the cell labels
# also for a Q-Former (``reader.train_reader(for_qformer=True)``), so that the captioner sees every
# cell without stage 0 paying for the cell objective (the ITM, which reads stage 0, fell under 0.9
# on cell-trained towers). Such a build fits the 30 minutes; with ``reader_tune`` its reader reads
# shapes as well as one trained for reading alone, but its captioner reads them worse than one on a
# stage 0 trained on the cells for 1,200 steps (BENCHMARKS.md).
CAPTIONER_TOWER = "vision"
# "vision" is stage 0, the BLIP-2 vision tower; it is stored inside reward_itm and captioner.
# "reader" is that tower with linear heads that read each grid cell (shapes_world.reader), the
# verifier of the claims reward.
MODELS = ("reward_clip", "eval_clip", "vision", "reward_itm", "captioner", "reader")
# With ``--jobs 2`` these groups train side by side, each in its own process with its share of the
# threads (neither needs the other's models); the captioner, which starts from the ITM's Q-Former
# and reads the reader's tower, follows with all of them. On 2 cores a CLIP, tower or ITM step takes
# only 1.2-1.5 times as long on one thread as on two, so two stages at once finish sooner than one
# after the other.
PARALLEL_GROUPS = (("vision", "reward_itm"), ("reward_clip", "eval_clip", "reader"))
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


def models_read(a: argparse.Namespace, only: set[str]) -> set[str]:
    """The saved models that building ``only`` reads from ``--out``: the ITM (its stage-0 tower
    and Q-Former) unless stage 0 and the ITM are both rebuilt, the reader for a captioner on its tower."""
    needs_itm = bool(only & {"reward_itm", "captioner"}) or ("reader" in only and a.reader_tower == "itm")
    reads = {"reward_itm"} if needs_itm and not only >= {"vision", "reward_itm"} else set()
    return reads | ({"reader"} if "captioner" in only and a.captioner_tower == "reader" else set())


def build_in_worker(args: dict, steps: dict, only: list[str], root: str, out: str, threads: int) -> tuple[dict, dict]:
    torch.set_num_threads(threads)
    return build(argparse.Namespace(**args), steps, set(only), Path(root), Path(out))


def build(a: argparse.Namespace, steps: dict, only: set[str], root: Path, out: Path) -> tuple[dict, dict]:
    """Train and save the models in ``only`` (reading the others it needs from ``out``); returns
    their metrics and each stage's seconds."""
    metrics: dict = {}
    timings: dict = {}
    if not only:
        return metrics, timings
    train = load_split(root / "train.parquet", limit=a.train_limit)
    test = load_split(root / "test.parquet")
    tokenizer = build_tokenizer()
    metrics["num_train"] = len(train.images)
    reads = models_read(a, only)

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
        build_fn, aux = objective(a.reward_clip_cell_loss if name == "reward_clip" else 0.0, a.reward_clip_cell_readout,
                                  subset.scenes, build_clip_with_positions)
        model = train_clip(subset, CLIP_CONFIGS[cfg_name], seed=SEEDS[name], steps=steps[name], name=name,
                           build=build_fn, aux_loss=aux, hard_negatives=negatives)
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
    saved_itm = Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm")) if "reward_itm" in reads else None
    vision = saved_itm.vision_model if saved_itm is not None else None
    if "vision" in only:
        t0 = time.time()
        build_fn, aux = objective(a.vision_cell_loss, a.vision_cell_readout, train.scenes, build_stage0)
        stage0 = train_clip(train, STAGE0_CLIP, seed=SEEDS["vision"], steps=steps["vision"], name="vision", build=build_fn,
                            aux_loss=aux)
        vision = stage0.visual.model
        metrics["vision"] = clip_alt_text_metrics(stage0, test)
        timings["vision"] = time.time() - t0
        print("vision", metrics["vision"], flush=True)

    itm = saved_itm
    if "reward_itm" in only:
        t0 = time.time()
        itm = train_itm(train, tokenizer, vision, seed=SEEDS["itm"], steps=steps["itm"], batch_size=ITM_BATCH,
                        counterfactuals=ITM_COUNTERFACTUALS)
        save_blip2(itm, tokenizer, out / "reward_itm")
        metrics["reward_itm"] = itm_rank_accuracy(itm, tokenizer, test.images, [a[0] for a in test.alt_texts])
        timings["reward_itm"] = time.time() - t0
        print("reward_itm", metrics["reward_itm"], flush=True)

    from shapes_world.reader import CellReader, load_tower, save_tower

    if "reader" in only:
        import copy
        import shutil

        from shapes_world.reader import fit_reader, train_reader, tune_reader

        t0 = time.time()
        metrics["reader_tower"] = a.reader_tower
        shutil.rmtree(out / CAPTIONER_TOWER_DIR, ignore_errors=True)  # only a tuned reader's build has one
        if a.reader_tower == "own":
            for_qformer = a.captioner_tower == "reader"
            reader = train_reader(train.images, train.scenes, steps=steps["reader_tower"], seed=SEEDS["reader"],
                                  for_qformer=for_qformer)
            if steps["reader_tune"]:
                if for_qformer:  # the captioner's tower: the one trained for a Q-Former, before tuning
                    save_tower(reader.tower, out / CAPTIONER_TOWER_DIR)
                reader = tune_reader(reader, train.images, train.scenes, steps=steps["reader_tune"], seed=SEEDS["reader"])
        else:  # a copy of the ITM's (stage-0) tower: the reward ITM and the captioner are built on it
            reader = fit_reader(copy.deepcopy(itm.vision_model), train.images[:READER_SCENES],
                                train.scenes[:READER_SCENES], steps=steps["reader"], seed=SEEDS["reader"])
        metrics["reader"] = reader.accuracy(test.images, test.scenes)
        reader.info["test_accuracy"] = metrics["reader"]
        reader.save(out / "reader")
        timings["reader"] = time.time() - t0
        print("reader", metrics["reader"], flush=True)
    elif "reader" in reads:
        reader = CellReader.load(out / "reader")

    from shapes_world.pretrain.captioner import train_captioner

    if "captioner" in only:
        t0 = time.time()
        tower = vision
        if a.captioner_tower == "reader":
            tower = reader.tower
            if reader.info.get("tuned_steps"):
                if not (out / CAPTIONER_TOWER_DIR).is_dir():
                    raise FileNotFoundError(f"{out / 'reader'} was tuned for reading, and the tower it had before, the "
                                            f"captioner's, is not in {out / CAPTIONER_TOWER_DIR}: rebuild with "
                                            f"--only reader,captioner")
                tower = load_tower(out / CAPTIONER_TOWER_DIR)
        captioner = train_captioner(train, tokenizer, tower, itm, seed=SEEDS["captioner"], lm_steps=steps["lm"],
                                    steps=steps["captioner"], cell_loss_weight=a.captioner_cell_loss)
        save_blip2(captioner, tokenizer, out / "captioner")
        timings["captioner"] = time.time() - t0
    return metrics, timings


# The captioner's tower when the reader's was tuned after it (``reader_tune``).
CAPTIONER_TOWER_DIR = "captioner_tower"
