"""What does a frozen vision tower encode? Linear probes per grid cell.

    python -m shapes_world.probe --model models/shapes/reward_itm --data data/shapes

The captioner (and the RL policy built on it) can only describe what its frozen vision tower
encodes. This trains one linear classifier per attribute on the tower's output tokens (all
tokens flattened, so the token index gives the position) to predict, for each of the 9 grid
cells, the shape / colour / size of the object there or "empty", and prints test accuracy on
the occupied cells and on telling empty from occupied. What the probe cannot read, a captioner on
this tower cannot state reliably either; the converse does not hold (BENCHMARKS.md, issue 3).
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from shapes_world.world import CELL_ATTRIBUTES, POSITIONS, cell_labels

BLIP2_CLASSES = ("Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration")


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
    p.add_argument("--model", default="models/shapes/reward_itm", help="a saved BLIP-2 model (its vision tower is probed)")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    try:
        arch = (transformers.AutoConfig.from_pretrained(a.model).architectures or ["?"])[0]
    except (OSError, ValueError) as e:
        p.error(f"--model {a.model}: not a saved transformers model ({e})")
    if arch not in BLIP2_CLASSES:
        p.error(f"--model {a.model}: a saved {' or '.join(BLIP2_CLASSES)} is needed, its config names {arch}")
    tower = getattr(transformers, arch).from_pretrained(a.model).vision_model.eval()
    train = load_split(f"{a.data}/train.parquet", limit=a.train_limit)
    test = load_split(f"{a.data}/test.parquet")
    tr, te = vision_embeds(tower, train.images), vision_embeds(tower, test.images)
    result = probe_cells(tr.flatten(1), train.scenes, te.flatten(1), test.scenes, steps=a.steps)
    print(f"linear probes of {a.model}'s vision tower tokens ({len(train.scenes)} train / {len(test.scenes)} test scenes)")
    print(f"{'attribute':<9} {'occupied-cell acc':>17} {'chance':>7} {'empty-vs-object acc':>20}")
    for attr, r in result.items():
        print(f"{attr:<9} {r['occupied_acc']:>17.3f} {1 / len(CELL_ATTRIBUTES[attr]):>7.3f} {r['empty_acc']:>20.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
