"""Linear read-outs of each grid cell's attributes from an image tower's features.

One classifier per attribute maps features ``[N, D]`` to the 9 cells x (its values + "empty"),
or, read locally, each cell's own features ``[N, 9, D]`` (``local_cell_features``) to its values
+ "empty", one classifier shared by all cells. The probes (``shapes_world.probe``) fit them on
frozen features to ask what a tower knows; the cell-label objective
(``pretrain.clip.CellLabelLoss``) trains them with the tower, so that the tower learns to tell
each cell's shape, colour and size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shapes_world.world import BACKGROUNDS, CELL_ATTRIBUTES, POSITIONS, cell_labels

# With the background: every cell, empty or not, also tells the scene's background.
WITH_BACKGROUND = CELL_ATTRIBUTES | {"background": list(BACKGROUNDS)}


def cell_heads(dim: int, cells: int = len(POSITIONS), attributes: dict = CELL_ATTRIBUTES) -> nn.ModuleDict:
    """One linear classifier per attribute: features ``[N, dim]`` -> ``cells`` x (values + empty);
    ``cells=1`` for features already per cell (``[N, 9, dim]``)."""
    return nn.ModuleDict({a: nn.Linear(dim, cells * (len(v) + 1)) for a, v in attributes.items()})


def labels_with_background(scenes: list[dict]) -> dict:
    """``world.cell_labels`` plus ``"background"`` ``[N, 9]``: the scene's background index in
    every cell. Without it, an objective that calls every empty cell just "empty" teaches the
    tower to drop the background from its patch tokens."""
    labels = cell_labels(scenes)
    names = list(BACKGROUNDS)
    labels["background"] = torch.tensor([[names.index(s["background"])] * len(POSITIONS) for s in scenes],
                                        dtype=torch.long).view(len(scenes), len(POSITIONS))
    return labels


def cell_patch_weights(grid: int) -> torch.Tensor:
    """``[9, grid * grid]``: the share of each grid cell (3 x 3, row-major as ``POSITIONS``) that
    each patch of a ``grid`` x ``grid`` ViT covers; each row sums to 1."""
    edges_c, edges_p = torch.linspace(0, 1, 4), torch.linspace(0, 1, grid + 1)
    lo = torch.maximum(edges_c[:-1, None], edges_p[None, :-1])
    overlap = (torch.minimum(edges_c[1:, None], edges_p[None, 1:]) - lo).clamp(min=0)  # [3, grid], one axis
    w = (overlap[:, None, :, None] * overlap[None, :, None, :]).reshape(9, grid * grid)  # rows (r, c), cols (i, j)
    return w / w.sum(1, keepdim=True)


def local_cell_features(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, 9, D]``: each grid cell's features, the mean of the patch tokens over it weighted by
    how much of it each covers, from a ViT's output tokens ``[B, 1 + grid * grid, D]`` ([CLS]
    first, patches row-major)."""
    grid = int(round((tokens.shape[1] - 1) ** 0.5))
    if grid * grid != tokens.shape[1] - 1:
        raise ValueError(f"{tokens.shape[1]} tokens are not [CLS] + a square grid of patches")
    return torch.einsum("cp,bpd->bcd", cell_patch_weights(grid).to(tokens), tokens[:, 1:])


# How heads read the cells from a tower's tokens: "flat", every cell from all tokens at once (the
# tower may keep a cell's facts in any token); "local", each cell from the patch tokens over it.
READOUTS = ("flat", "local")


def check_readout(readout: str) -> None:
    """Raise ValueError unless ``readout`` is one of :data:`READOUTS`."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")


def readout_features(tokens: torch.Tensor, readout: str) -> torch.Tensor:
    """Features of tokens ``[B, T, D]`` for :func:`readout_heads`: ``[B, T * D]`` (flat) or
    ``[B, 9, D]`` (local, :func:`local_cell_features`)."""
    check_readout(readout)
    return local_cell_features(tokens) if readout == "local" else tokens.flatten(1)


def readout_heads(dim: int, readout: str, attributes: dict = CELL_ATTRIBUTES) -> nn.ModuleDict:
    """:func:`cell_heads` for features of :func:`readout_features` whose last dimension is ``dim``."""
    check_readout(readout)
    return cell_heads(dim, cells=1 if readout == "local" else len(POSITIONS), attributes=attributes)


def cell_loss(heads: nn.ModuleDict, x: torch.Tensor, labels: dict, rows: torch.Tensor) -> torch.Tensor:
    """Summed over attributes: the cross-entropy of every cell's value, features ``x`` ``[B, dim]``
    (or per cell, ``[B, 9, dim]``, with ``cell_heads(dim, cells=1)``) of the scenes ``rows``
    ``[B]`` (indices into ``labels``, from ``world.cell_labels``)."""
    return sum(F.cross_entropy(h(x).view(len(rows) * len(POSITIONS), -1), labels[a][rows].reshape(-1))
               for a, h in heads.items())


def fit_heads(heads: nn.ModuleDict, x: torch.Tensor, labels: dict, *, steps: int, batch: int = 512, lr: float = 1e-3,
              generator: torch.Generator | None = None) -> nn.ModuleDict:
    """Adam on :func:`cell_loss` of ``heads`` over fixed features ``x`` (rows sampled ``batch`` at a
    time, ``steps`` times): how the probes and the cell reader fit their linear heads."""
    opt = torch.optim.Adam(heads.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (min(batch, len(x)),), generator=generator)
        loss = cell_loss(heads, x[rows], labels, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads


def token_position_loss(position_head: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each token's own index ``[0, T)``, read back by ``position_head`` from
    tokens ``[B, T, D]``: a tower trained on it keeps its tokens' places, which a Q-Former reading
    them by attention needs (``pretrain.vision``)."""
    logits = position_head(tokens)  # [B, T, T]
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def train_tower(tower, heads: nn.ModuleDict, images_u8: torch.Tensor, labels: dict, *, steps: int, batch: int = 256,
                lr: float = 1e-3, warmup: int = 50, generator: torch.Generator | None = None,
                local_heads: nn.ModuleDict | None = None, position_head: nn.Linear | None = None) -> None:
    """AdamW on :func:`cell_loss`, the ``tower`` (a ``Blip2VisionModel``) and flat ``heads`` (on
    all its tokens) trained together on images ``[N, 3, S, S]`` uint8 and their cell ``labels``:
    how ``probe.supervised_tower`` and a reader with its own tower (``reader.train_reader``) learn.
    ``local_heads`` (:func:`readout_heads` ``"local"``) add the same loss read from each cell's own
    patches, ``position_head`` :func:`token_position_loss`: what a Q-Former needs of the tower."""
    from shapes_world.pretrain.common import cosine_steps, normalize

    extra = [m for m in (local_heads, position_head) if m is not None]
    params = [p for m in (tower, heads, *extra) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    tower.train()
    for _ in cosine_steps(opt, steps, lr, warmup):
        rows = torch.randint(0, len(images_u8), (batch,), generator=generator)
        out = tower(pixel_values=normalize(images_u8[rows])).last_hidden_state
        loss = cell_loss(heads, out.flatten(1), labels, rows)
        if local_heads is not None:
            loss = loss + cell_loss(local_heads, local_cell_features(out), labels, rows)
        if position_head is not None:
            loss = loss + token_position_loss(position_head, out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval()


@torch.no_grad()
def cell_accuracy(heads: nn.ModuleDict, x: torch.Tensor, scenes: list[dict]) -> dict[str, dict[str, float]]:
    """Per attribute: accuracy of the value on occupied cells (all, and by the object's size) and
    of "empty or not" over all cells."""
    y = cell_labels(scenes)
    small = y["size"] == CELL_ATTRIBUTES["size"].index("small")
    result = {}
    for a, h in heads.items():
        empty = len(CELL_ATTRIBUTES[a])
        pred = h(x).view(len(x), len(POSITIONS), -1).argmax(-1)
        occupied = y[a] != empty
        hit = (pred == y[a]).float()
        result[a] = {"occupied_acc": float(hit[occupied].mean()), "small_acc": float(hit[occupied & small].mean()),
                     "large_acc": float(hit[occupied & ~small].mean()),
                     "empty_acc": float(((pred == empty) == ~occupied).float().mean())}
    return result
