"""Shared helpers for pretraining: split loading into tensors, seeding, schedules."""
from __future__ import annotations

import io
import json
import math
import random
import time
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

# Images are fed as [0,1] RGB normalised with mean/std 0.5, for every shapes-world model.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
# Length groups per training forward over text (``vlrm.length_groups``): alt-texts and captions
# run from 2 to 41 tokens, and padding every row of a batch to the longest ran a third to a half
# padding.
LENGTH_GROUPS = 4


@dataclass
class SplitTensors:
    images: torch.Tensor  # [N, 3, H, W] uint8
    captions: list[list[str]]
    alt_texts: list[list[str]]
    scenes: list[dict]


def load_split(path: str | Path, limit: int | None = None) -> SplitTensors:
    table = pq.read_table(path)
    if limit is not None:
        table = table.slice(0, limit)
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist()])
    return SplitTensors(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        captions=table.column("captions").to_pylist(),
        alt_texts=table.column("alt_texts").to_pylist(),
        scenes=[json.loads(s) for s in table.column("scene").to_pylist()],
    )


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cosine_steps(opt: Any, steps: int, base: float, warmup: int):
    """``range(steps)``, with every step's cosine learning rate set on ``opt`` first."""
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, base, warmup)
        yield step


class Progress:
    """A one-line progress print every ``every`` seconds."""

    def __init__(self, name: str, total: int, every: float = 30.0):
        self.name, self.total, self.every = name, total, every
        self.start = self.last = time.time()

    def __call__(self, step: int, **metrics: float) -> None:
        now = time.time()
        if now - self.last >= self.every or step == self.total - 1:
            self.last = now
            vals = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            eta = (now - self.start) / (step + 1) * (self.total - step - 1)
            print(f"[{self.name}] step {step + 1}/{self.total} {vals} ({now - self.start:.0f}s, eta {eta:.0f}s)",
                  flush=True)


@torch.no_grad()
def vision_embeds(vision_model, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Outputs of a frozen vision tower over a whole split, computed once."""
    return torch.cat([vision_model(pixel_values=normalize(images_u8[i:i + batch])).last_hidden_state
                      for i in range(0, len(images_u8), batch)])


def query_outputs(model, img_embeds: torch.Tensor) -> torch.Tensor:
    """``[B, Q, D]`` Q-Former query outputs (no text) of a BLIP-2 model of either class, from
    vision-tower outputs ``[B, T, D_vision]``: what the captioner's language model is given."""
    q = model.query_tokens.expand(img_embeds.shape[0], -1, -1)
    mask = torch.ones(img_embeds.shape[:2], dtype=torch.long, device=img_embeds.device)
    return model.qformer(query_embeds=q, encoder_hidden_states=img_embeds, encoder_attention_mask=mask).last_hidden_state
