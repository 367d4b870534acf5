"""Stage 0, the EVA-CLIP analogue: a contrastively pretrained vision tower for the BLIP-2 models.

Real BLIP-2 freezes a vision tower that CLIP-style training on web alt-text has already made
good; ours are tiny and start from nothing, so we make one the same way. The image tower is the
captioner's own class (``Blip2VisionModel``, pooled output + a linear projection) inside an
open_clip ``CLIP`` whose text tower and training loop are the reward CLIP's. The ITM model and the
captioner then start from this tower and keep it frozen, as BLIP-2 does.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2VisionModel

from shapes_world.models import vision_config
from shapes_world.pretrain.clip import build_clip

# Text tower and embedding size for stage 0 (the vision side is ``models.vision_config``).
STAGE0_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16, "head_width": 32},  # replaced below
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 3},
}


class Blip2VisionTower(nn.Module):
    """``Blip2VisionModel`` as an open_clip image tower: pooled ([CLS]) output -> embedding."""

    def __init__(self, image_size: int, embed_dim: int):
        super().__init__()
        self.model = Blip2VisionModel(vision_config(image_size))
        self.proj = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.model(pixel_values=pixel_values).pooler_output)


def build_stage0(model_cfg: dict = STAGE0_CLIP):
    model = build_clip(model_cfg)
    model.visual = Blip2VisionTower(model_cfg["vision_cfg"]["image_size"], model_cfg["embed_dim"])
    return model
