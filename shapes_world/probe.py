"""What does a BLIP-2 model's image side encode? Linear probes per grid cell.

    python -m shapes_world.probe --model models/shapes/captioner --features tokens,cls,mean,qformer
    python -m shapes_world.probe --supervised-steps 1200 [--patch-size 8] [--small-radius 0.3] [--image-size 96]

The captioner (and the RL policy built on it) can only describe what reaches its language model.
This trains one linear classifier per attribute to predict, for each of the 9 grid cells, the
shape / colour / size of the object there or "empty", and prints test accuracy on the occupied
cells (all, small objects, large objects) and on telling empty from occupied, for each kind of
feature (``FEATURES``):

- ``tokens``: the frozen vision tower's output tokens, all flattened (the token index gives
  the position): what the tower knows;
- ``cls`` / ``mean``: its [CLS] token / the mean of its tokens: what a pooled summary keeps;
- ``qformer``: the Q-Former's query outputs, flattened: what the language model is given.

What a probe cannot read, a captioner reading those features cannot state reliably either; the
converse does not hold. ``--supervised-steps`` asks the question one level down: how well can a
tower of this class and size read the cells at all in that many steps, trained on the cells'
labels directly (``supervised_tower``), in the world as it is or drawn again with another
object size or image size. On the committed models (BENCHMARKS.md, "What limits the truth of the
tuned captions?") the tower reads colour and size 0.97-0.99 but a small object's shape near
chance, and so does a tower trained on the labels themselves for as many steps.
"""
from __future__ import annotations

import argparse
import json

import torch

from shapes_world.cells import cell_accuracy, cell_heads, fit_heads, train_tower
from shapes_world.world import CELL_ATTRIBUTES, cell_labels

BLIP2_CLASSES = ("Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration")
FEATURES = ("tokens", "cls", "mean", "qformer")


@torch.no_grad()
def image_features(model, tokens: torch.Tensor, kind: str, batch: int = 500) -> torch.Tensor:
    """``[N, D]`` features of a BLIP-2 model (either class), given its vision tower's output
    ``tokens`` ``[N, 1 + patches, D]`` (``pretrain.common.vision_embeds``, computed once per split)."""
    from shapes_world.pretrain.common import query_outputs

    if kind not in FEATURES:
        raise ValueError(f"unknown feature kind {kind!r}; choose from {FEATURES}")
    if kind == "tokens":
        return tokens.flatten(1)
    if kind == "cls":
        return tokens[:, 0]
    if kind == "mean":
        return tokens.mean(1)
    return torch.cat([query_outputs(model, tokens[i:i + batch]).flatten(1) for i in range(0, len(tokens), batch)])


def probe_cells(train_x: torch.Tensor, train_scenes: list[dict], test_x: torch.Tensor, test_scenes: list[dict],
                *, steps: int = 1500, batch: int = 512, lr: float = 1e-3, seed: int = 0) -> dict[str, dict[str, float]]:
    """Linear probes from features ``[N, D]`` to each cell's attributes.

    Returns ``{attribute: {"occupied_acc", "small_acc", "large_acc", "empty_acc"}}`` on the test
    features: accuracy of the value on occupied cells (all, small objects, large objects), and of
    "empty or not" over all cells.
    """
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    labels = cell_labels(train_scenes)
    heads = fit_heads(cell_heads(train_x.shape[1]), train_x, labels, steps=steps, batch=batch, lr=lr, generator=gen)
    return cell_accuracy(heads, test_x, test_scenes)


def supervised_tower(train_images: torch.Tensor, train_scenes: list[dict], test_images: torch.Tensor,
                     test_scenes: list[dict], *, steps: int, patch_size: int = 16, batch: int = 256, lr: float = 1e-3,
                     warmup: int = 50, seed: int = 0) -> dict[str, dict[str, float]]:
    """A ceiling for the tower: a fresh vision tower of the captioner's class
    (``Blip2VisionModel``, ``models.vision_config`` with ``patch_size``) trained for ``steps``
    *with the cells' labels*, jointly with the probe's linear heads on its flattened tokens.
    Images ``[N, 3, H, W]`` uint8. What it cannot read after as many steps as stage 0 has, a
    contrastively trained tower of that size cannot be expected to read either."""
    from transformers import Blip2VisionModel

    from shapes_world.models import vision_config
    from shapes_world.pretrain.common import normalize

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tower = Blip2VisionModel(vision_config(train_images.shape[-1], patch_size))
    heads = cell_heads(tower.embeddings.num_positions * tower.config.hidden_size)
    train_tower(tower, heads, train_images, cell_labels(train_scenes), steps=steps, batch=batch, lr=lr, warmup=warmup,
                generator=gen)
    with torch.no_grad():
        tokens = torch.cat([tower(pixel_values=normalize(test_images[i:i + 500])).last_hidden_state.flatten(1)
                            for i in range(0, len(test_images), 500)])
    return cell_accuracy(heads, tokens, test_scenes)


def rerender(scenes: list[dict], image_size: int, small_radius: float, seed: int = 0) -> torch.Tensor:
    """``[N, 3, S, S]`` uint8: the scenes drawn again at another size or small-object radius (the
    jitter drawn afresh from ``seed``), to ask what a change of the world would buy."""
    import numpy as np

    from shapes_world import world

    rng = np.random.default_rng(seed)
    radius = dict(world.RADIUS, small=small_radius)
    images = [np.asarray(world.render(world.Scene.from_dict(d), image_size, jitter=rng, radius=radius)) for d in scenes]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def _print_rows(kind: str, result: dict) -> None:
    for attr, r in result.items():
        print(f"{kind:<10} {attr:<9} {r['occupied_acc']:>9.3f} {r['small_acc']:>7.3f} {r['large_acc']:>7.3f} "
              f"{1 / len(CELL_ATTRIBUTES[attr]):>7.3f} {r['empty_acc']:>14.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    import transformers

    from shapes_world.pretrain.common import load_split, vision_embeds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes/reward_itm", help="a saved BLIP-2 model (either class)")
    p.add_argument("--features", default="tokens", help=f"comma-separated, from {','.join(FEATURES)}")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="instead of probing --model: train a fresh tower of its class on the cells' labels for this "
                        "many steps (supervised_tower), a ceiling for what that tower learns in as many steps")
    p.add_argument("--patch-size", type=int, default=None, help="with --supervised-steps: the tower's patch size")
    p.add_argument("--image-size", type=int, default=None, help="with --supervised-steps: draw the scenes again at this size")
    p.add_argument("--small-radius", type=float, default=None,
                   help="with --supervised-steps: draw the scenes again with this radius of small objects (share of a cell)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    kinds = [k for k in a.features.split(",") if k]
    if not kinds or set(kinds) - set(FEATURES):
        p.error(f"--features {a.features!r}: choose from {','.join(FEATURES)}")
    if not a.supervised_steps and (a.patch_size or a.image_size or a.small_radius is not None):
        p.error("--patch-size, --image-size and --small-radius apply to --supervised-steps only")
    if not a.supervised_steps:  # checked before the splits are read
        try:
            arch = (transformers.AutoConfig.from_pretrained(a.model).architectures or ["?"])[0]
        except (OSError, ValueError) as e:
            p.error(f"--model {a.model}: not a saved transformers model ({e})")
        if arch not in BLIP2_CLASSES:
            p.error(f"--model {a.model}: a saved {' or '.join(BLIP2_CLASSES)} is needed, its config names {arch}")
    torch.set_num_threads(a.threads)
    train = load_split(f"{a.data}/train.parquet", limit=a.train_limit)
    test = load_split(f"{a.data}/test.parquet")
    header = f"{'features':<10} {'attribute':<9} {'occupied':>9} {'small':>7} {'large':>7} {'chance':>7} {'empty-vs-object':>14}"
    if a.supervised_steps:
        from shapes_world.models import PATCH_SIZE
        from shapes_world.world import RADIUS

        size = a.image_size or train.images.shape[-1]
        radius = RADIUS["small"] if a.small_radius is None else a.small_radius
        tr_img, te_img = train.images, test.images
        if a.image_size or a.small_radius is not None:
            tr_img, te_img = rerender(train.scenes, size, radius, seed=1), rerender(test.scenes, size, radius, seed=2)
        patch = a.patch_size or PATCH_SIZE
        print(f"a fresh tower (patch {patch}, {size} px, small radius {radius}) trained {a.supervised_steps} steps on the "
              f"cells' labels ({len(train.scenes)} train / {len(test.scenes)} test scenes); accuracy per grid cell")
        print(header)
        results = {"supervised": supervised_tower(tr_img, train.scenes, te_img, test.scenes, steps=a.supervised_steps,
                                                  patch_size=patch)}
        _print_rows("supervised", results["supervised"])
        print(json.dumps(results))
        return
    model = getattr(transformers, arch).from_pretrained(a.model).eval()
    results = {}
    print(f"linear probes per grid cell of {a.model} ({len(train.scenes)} train / {len(test.scenes)} test scenes)")
    print(header)
    train_tokens, test_tokens = vision_embeds(model.vision_model, train.images), vision_embeds(model.vision_model, test.images)
    for kind in kinds:
        tr, te = image_features(model, train_tokens, kind), image_features(model, test_tokens, kind)
        results[kind] = probe_cells(tr, train.scenes, te, test.scenes, steps=a.steps)
        _print_rows(kind, results[kind])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
