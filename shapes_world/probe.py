"""What does a BLIP-2 model's image side encode? Linear probes per grid cell.

    python -m shapes_world.probe --model models/shapes/captioner --features tokens,cls,mean,qformer

The captioner (and the RL policy built on it) can only describe what reaches its language model.
This trains one linear classifier per attribute to predict, for each of the 9 grid cells, the
shape / colour / size of the object there or "empty", and prints test accuracy on the occupied
cells and on telling empty from occupied, for each kind of feature (``FEATURES``):

- ``tokens``: the frozen vision tower's output tokens, all flattened (the token index gives
  the position): what the tower knows;
- ``cls`` / ``mean``: its [CLS] token / the mean of its tokens: what a pooled summary keeps;
- ``qformer``: the Q-Former's query outputs, flattened: what the language model is given.

What a probe cannot read, a captioner reading those features cannot state reliably either; the
converse does not hold. On the committed models the tower's tokens carry each cell (colour 0.98)
but the Q-Former's queries keep about what the [CLS] token does (BENCHMARKS.md, "What limits the truth of the tuned captions?").
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from shapes_world.world import CELL_ATTRIBUTES, POSITIONS, cell_labels

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

    Returns ``{attribute: {"occupied_acc": ..., "empty_acc": ...}}`` on the test features:
    accuracy of the value on occupied cells, and of "empty or not" over all cells.
    """
    gen = torch.Generator().manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    train_y, test_y = cell_labels(train_scenes), cell_labels(test_scenes)
    cells = len(POSITIONS)
    heads = {a: torch.nn.Linear(train_x.shape[1], cells * (len(v) + 1)) for a, v in CELL_ATTRIBUTES.items()}
    params = [p for h in heads.values() for p in h.parameters()]
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        rows = torch.randint(0, len(train_x), (min(batch, len(train_x)),), generator=gen)
        loss = sum(F.cross_entropy(h(train_x[rows]).view(len(rows) * cells, -1), train_y[a][rows].reshape(-1))
                   for a, h in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    result = {}
    with torch.no_grad():
        for a, h in heads.items():
            empty = len(CELL_ATTRIBUTES[a])
            pred = h(test_x).view(len(test_x), cells, -1).argmax(-1)
            occupied = test_y[a] != empty
            result[a] = {"occupied_acc": float((pred[occupied] == test_y[a][occupied]).float().mean()),
                         "empty_acc": float(((pred == empty) == ~occupied).float().mean())}
    return result


def main(argv: list[str] | None = None) -> None:
    import transformers

    from shapes_world.pretrain.common import load_split, vision_embeds

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes/reward_itm", help="a saved BLIP-2 model (either class)")
    p.add_argument("--features", default="tokens", help=f"comma-separated, from {','.join(FEATURES)}")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    kinds = [k for k in a.features.split(",") if k]
    if not kinds or set(kinds) - set(FEATURES):
        p.error(f"--features {a.features!r}: choose from {','.join(FEATURES)}")
    torch.set_num_threads(a.threads)
    try:
        arch = (transformers.AutoConfig.from_pretrained(a.model).architectures or ["?"])[0]
    except (OSError, ValueError) as e:
        p.error(f"--model {a.model}: not a saved transformers model ({e})")
    if arch not in BLIP2_CLASSES:
        p.error(f"--model {a.model}: a saved {' or '.join(BLIP2_CLASSES)} is needed, its config names {arch}")
    model = getattr(transformers, arch).from_pretrained(a.model).eval()
    train = load_split(f"{a.data}/train.parquet", limit=a.train_limit)
    test = load_split(f"{a.data}/test.parquet")
    results = {}
    print(f"linear probes per grid cell of {a.model} ({len(train.scenes)} train / {len(test.scenes)} test scenes)")
    print(f"{'features':<8} {'attribute':<9} {'occupied-cell acc':>17} {'chance':>7} {'empty-vs-object acc':>20}")
    train_tokens, test_tokens = vision_embeds(model.vision_model, train.images), vision_embeds(model.vision_model, test.images)
    for kind in kinds:
        tr, te = image_features(model, train_tokens, kind), image_features(model, test_tokens, kind)
        results[kind] = probe_cells(tr, train.scenes, te, test.scenes, steps=a.steps)
        for attr, r in results[kind].items():
            print(f"{kind:<8} {attr:<9} {r['occupied_acc']:>17.3f} {1 / len(CELL_ATTRIBUTES[attr]):>7.3f} {r['empty_acc']:>20.3f}",
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
