"""A cell reader: what each grid cell of a shapes-world image holds, read from a frozen vision
tower by linear heads, and how likely each claim of a caption is by that reading.

The reader is the shapes world's question-answering model (the verifier of the ``claims`` reward,
``rewards/claims.py``): asked "is there a square?", "is the square at the top red?", it answers
with a probability. It is a BLIP-2 vision tower and one linear classifier per attribute over each
cell's features (``shapes_world.cells``), fitted in pretraining on the world's cell labels, as
the CLIPs are fitted on its alt-texts; at RL time it sees only the image and the caption. The
tower is either the frozen stage-0 tower the reward ITM and the captioner are built on
(:func:`fit_reader`) or its own, trained with the heads (:func:`train_reader`).

A caption's claims are the mentions of ``shapes_world.parse.parse_caption``, modifiers that no
noun takes included unless ``unbound=False`` ("a large blue at the top" claims a large blue object
at the top; without it a policy learnt to leave the noun out, BENCHMARKS.md), each judged as
``parse.is_true`` judges it against the scene, with the reader's per-cell probabilities in place
of the scene (cells independent): for ``obj_c(s)``, the probability that cell ``c`` holds a shape
``s`` (for a generic noun: any object) and ``P_c(a = v | object)`` that its object's attribute
``a`` is ``v``,

    shape s                   1 - prod_c (1 - obj_c(s))
    colour / size v of s      1 - prod_c (1 - obj_c(s) * P_c(a = v | object))
    position p of s           obj_p(s)
    count n of s              P(exactly n cells hold s)   (Poisson binomial over obj_c(s))
    background b              mean_c P_c(background = b)

Saved as a folder: ``vision/`` (the tower, ``save_pretrained``, safetensors), ``heads.safetensors``
(the heads and the features' normalisation), both in float16, and ``reader.json`` (readout,
attributes, accuracy).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shapes_world.cells import (WITH_BACKGROUND, cell_accuracy, check_readout, fit_heads, labels_with_background,
                                readout_features, readout_heads)
from shapes_world.parse import Mention, parse_caption
from shapes_world.world import POSITIONS, SHAPES

__all__ = ["CellReader", "fit_reader", "mention_probability", "train_reader", "tune_reader"]

READER_FILE, HEADS_FILE = "reader.json", "heads.safetensors"


class CellReader:
    """A frozen ``Blip2VisionModel`` and linear heads: :meth:`probabilities` of every cell's
    shape, colour, size (each with "empty" last) and the background, :meth:`claims` of captions."""

    def __init__(self, tower, heads: torch.nn.ModuleDict, mean: torch.Tensor, std: torch.Tensor,
                 readout: str = "local", info: dict | None = None, device: str | torch.device = "cpu",
                 unbound: bool = True):
        check_readout(readout)
        self.device = torch.device(device)
        self.tower = tower.to(self.device).eval().requires_grad_(False)
        self.heads = heads.to(self.device).eval().requires_grad_(False)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.readout, self.unbound = readout, unbound
        self.info = dict(info or {})
        size = tower.config.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)

    # ---------------------------------------------------------------- reading
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised features: ``[B, 9, D]`` (local) or ``[B, T * D]`` (flat) of tower tokens ``[B, T, D]``."""
        return (readout_features(tokens, self.readout) - self.mean) / self.std

    def pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """``[B, 3, S, S]`` uint8 of PIL images, arrays or uint8 tensors, resized to the tower's size."""
        from PIL import Image

        from vlrm.images import to_pil

        out = []
        for im in images:
            pil = to_pil(im).convert("RGB")
            if pil.size != (self.image_size, self.image_size):
                pil = pil.resize((self.image_size, self.image_size), Image.BILINEAR)
            out.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))
        return torch.stack(out)

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Any], batch: int = 256) -> dict[str, torch.Tensor]:
        """``{attribute: FloatTensor[B, 9, values + 1]}`` (CPU): each cell's distribution, "empty" last."""
        from shapes_world.pretrain.common import normalize

        out: dict[str, list[torch.Tensor]] = {a: [] for a in self.heads}
        for s in range(0, len(images), batch):
            pix = normalize(self.pixels(images[s:s + batch])).to(self.device)
            x = self.features(self.tower(pixel_values=pix).last_hidden_state)
            for a, h in self.heads.items():
                out[a].append(h(x).view(len(pix), len(POSITIONS), -1).softmax(-1).float().cpu())
        return {a: torch.cat(v) for a, v in out.items()}

    def claims(self, images: Sequence[Any], captions: Sequence[str],
               index: Sequence[int]) -> list[tuple[list[Mention], torch.Tensor]]:
        """Per caption, its mentions and ``FloatTensor[mentions]``: the probability of each, read
        from the image ``images[index[i]]``."""
        probs = self.probabilities(images)
        out = []
        for cap, row in zip(captions, index, strict=True):
            cells = {a: p[row] for a, p in probs.items()}
            mentions = parse_caption(cap, unbound=self.unbound)
            out.append((mentions, torch.tensor([mention_probability(cells, m) for m in mentions], dtype=torch.float32)))
        return out

    @torch.no_grad()
    def accuracy(self, images_u8: torch.Tensor, scenes: list[dict]) -> dict[str, dict[str, float]]:
        """``cells.cell_accuracy`` of the heads on these images (shape, colour, size)."""
        from shapes_world.pretrain.common import vision_embeds

        x = self.features(vision_embeds(self.tower, images_u8.to(self.device)))
        return cell_accuracy(torch.nn.ModuleDict({a: h for a, h in self.heads.items() if a != "background"}), x, scenes)

    # ---------------------------------------------------------------- storage
    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_tower(self.tower, path / "vision")
        tensors = {f"{a}.{k}": v for a, h in self.heads.items() for k, v in h.state_dict().items()}
        tensors |= {"mean": self.mean, "std": self.std}
        save_file({k: v.detach().cpu().half().contiguous() for k, v in tensors.items()}, str(path / HEADS_FILE))
        (path / READER_FILE).write_text(json.dumps({"readout": self.readout, "attributes": WITH_BACKGROUND} | self.info,
                                                   indent=2))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", unbound: bool = True) -> CellReader:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / READER_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a cell reader: it has no {READER_FILE} "
                                    f"(build one with `vlrm pretrain-shapes --only reader`)")
        meta = json.loads((path / READER_FILE).read_text())
        attributes = meta.get("attributes")
        if attributes != WITH_BACKGROUND:
            raise ValueError(f"{path / READER_FILE}: attributes {attributes} are not this world's {WITH_BACKGROUND}")
        tensors = {k: v.float() for k, v in load_file(str(path / HEADS_FILE)).items()}
        tower = load_tower(path / "vision")
        dim = tensors["shape.weight"].shape[1]
        heads = readout_heads(dim, meta["readout"], WITH_BACKGROUND)
        heads.load_state_dict({k: v for k, v in tensors.items() if k not in ("mean", "std")})
        info = {k: v for k, v in meta.items() if k not in ("readout", "attributes")}
        return cls(tower, heads, tensors["mean"], tensors["std"], readout=meta["readout"], info=info, device=device,
                   unbound=unbound)


def save_tower(tower, path: str | Path) -> None:
    """A ``Blip2VisionModel`` in float16 safetensors, as the CLIPs are stored (the committed models
    stay under 40 MB); :func:`load_tower` reads it back in float32."""
    tower.save_pretrained(path, state_dict={k: v.half() for k, v in tower.state_dict().items()}, safe_serialization=True)


def load_tower(path: str | Path):
    from transformers import Blip2VisionModel

    return Blip2VisionModel.from_pretrained(str(path), dtype=torch.float32).eval()


def fit_reader(tower, images_u8: torch.Tensor, scenes: list[dict], *, readout: str = "flat", steps: int = 1500,
               batch: int = 512, lr: float = 1e-3, seed: int = 0) -> CellReader:
    """Linear heads (shape, colour, size, background per cell) fitted on the frozen ``tower``'s
    tokens of ``images_u8`` ``[N, 3, S, S]`` to the cell labels of ``scenes``, as
    ``shapes_world.probe`` fits its probes. ``readout="flat"`` reads every cell from all tokens
    (on the committed tower, whose stage 0 had no cell labels, it read shapes 0.29 and colours
    0.86 locally against 0.49 and 0.98 flat); ``"local"`` from the patches over it."""
    from shapes_world.pretrain.common import vision_embeds

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tower = tower.eval().requires_grad_(False)
    with torch.no_grad():
        x = readout_features(vision_embeds(tower, images_u8), readout)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    labels = labels_with_background(scenes)
    heads = readout_heads(x.shape[-1], readout, WITH_BACKGROUND)
    fit_heads(heads, x, labels, steps=steps, batch=batch, lr=lr, generator=gen)
    return CellReader(tower, heads, mean, std, readout=readout,
                      info={"tower": "given", "steps": steps, "trained_on": len(scenes)})


def train_reader(images_u8: torch.Tensor, scenes: list[dict], *, steps: int, patch_size: int | None = None,
                 batch: int = 256, lr: float = 1e-3, seed: int = 0, for_qformer: bool = False) -> CellReader:
    """A reader with its own tower: a fresh ``Blip2VisionModel`` (``models.vision_config``, the
    stage-0 tower's class and size) trained ``steps`` together with flat heads on the cell labels
    of ``scenes`` (background included; ``cells.train_tower``), images ``[N, 3, S, S]`` uint8.
    A tower trained for reading reads shapes better than one trained for the captioner
    (BENCHMARKS.md, "What limits the truth of the tuned captions?"). ``for_qformer``: the tower
    also learns to keep each cell's facts in its own patches and each token's position (local
    heads and a position head, discarded after training), as stage 0 does for the Q-Former that
    reads it, so that a captioner can be built on it too."""
    from transformers import Blip2VisionModel

    from shapes_world.cells import train_tower
    from shapes_world.models import PATCH_SIZE, vision_config

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tower = Blip2VisionModel(vision_config(images_u8.shape[-1], patch_size or PATCH_SIZE))
    dim = tower.embeddings.num_positions * tower.config.hidden_size
    heads = readout_heads(dim, "flat", WITH_BACKGROUND)
    local_heads = position_head = None
    if for_qformer:
        width = tower.config.hidden_size
        local_heads = readout_heads(width, "local", WITH_BACKGROUND)
        position_head = torch.nn.Linear(width, tower.embeddings.num_positions)
    train_tower(tower, heads, images_u8, labels_with_background(scenes), steps=steps, batch=batch, lr=lr, generator=gen,
                local_heads=local_heads, position_head=position_head)
    # The heads were trained on the raw tokens: the identity normalisation.
    return CellReader(tower, heads, torch.zeros(dim), torch.ones(dim), readout="flat",
                      info={"tower": "own", "steps": steps, "trained_on": len(scenes), "for_qformer": for_qformer})


def tune_reader(reader: CellReader, images_u8: torch.Tensor, scenes: list[dict], *, steps: int, batch: int = 256,
                lr: float = 1e-3, seed: int = 0) -> CellReader:
    """A reader with its own tower (:func:`train_reader`), trained on ``steps`` more for reading
    alone: tower and flat heads on the cell labels, without the local heads and position loss
    that ``for_qformer`` adds. A tower trained for a Q-Former reads an occupied cell's shape at
    0.80; 400 more steps for reading bring it to 0.97, as a tower trained for reading alone reaches
    in 1,200 (BENCHMARKS.md). ``reader`` is left as it was."""
    import copy

    from shapes_world.cells import train_tower

    if reader.readout != "flat" or reader.info.get("tower") != "own":
        raise ValueError(f"tune_reader: needs a reader with its own tower and flat heads (train_reader), "
                         f"not tower={reader.info.get('tower')!r}, readout={reader.readout!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    tower, heads = copy.deepcopy(reader.tower).requires_grad_(True), copy.deepcopy(reader.heads).requires_grad_(True)
    train_tower(tower, heads, images_u8, labels_with_background(scenes), steps=steps, batch=batch, lr=lr, generator=gen)
    return CellReader(tower, heads, reader.mean, reader.std, readout="flat",
                      info=reader.info | {"tuned_steps": steps}, device=reader.device, unbound=reader.unbound)


# ---------------------------------------------------------------- a claim's probability


def _object_probability(cells: dict[str, torch.Tensor], shape: str | None) -> torch.Tensor:
    """``[9]``: the probability that each cell holds the shape (``None``: any object)."""
    p = cells["shape"]
    return 1.0 - p[:, -1] if shape is None else p[:, SHAPES.index(shape)]


def _given_object(cells: dict[str, torch.Tensor], attribute: str, value: str) -> torch.Tensor:
    """``[9]``: ``P_c(attribute = value | the cell holds an object)``."""
    p = cells[attribute]
    values = WITH_BACKGROUND[attribute]
    if value not in values:  # a value no object of this world has ("a white square"): never true
        return torch.zeros(len(p))
    # clamped: float rounding can put a cell's value a hair above its chance of holding an object
    return (p[:, values.index(value)] / (1.0 - p[:, -1]).clamp(min=1e-6)).clamp(max=1.0)


def _exactly(p: torch.Tensor, n: int) -> float:
    """P(exactly ``n`` of independent events with probabilities ``p`` happen): Poisson binomial."""
    dist = torch.zeros(len(p) + 1, dtype=torch.float64)
    dist[0] = 1.0
    for q in p.double():
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] = dist[0] * (1 - q)
    return float(dist[n]) if 0 <= n <= len(p) else 0.0


def mention_probability(cells: dict[str, torch.Tensor], mention: Mention) -> float:
    """The probability of one mention (``parse.Mention``) by one image's cell distributions
    ``{attribute: FloatTensor[9, values + 1]}`` (module docstring)."""
    kind, shape, value = mention
    if kind == "background":
        return float(_given_object(cells, "background", value).mean())
    obj = _object_probability(cells, shape)
    if kind == "shape":
        return float(1.0 - torch.prod(1.0 - obj))
    if kind in ("color", "size"):
        return float(1.0 - torch.prod(1.0 - obj * _given_object(cells, kind, value)))
    if kind == "position":
        return float(obj[POSITIONS.index(value)])
    if kind == "count":
        return _exactly(obj, int(value))
    raise ValueError(f"unknown mention kind {kind!r} in {mention!r}")
