"""Stage 0, the EVA-CLIP analogue: a contrastively pretrained vision tower for the BLIP-2 models.

Real BLIP-2 freezes a vision tower that CLIP-style training on web alt-text has already made
good; ours are tiny and start from nothing, so we make one the same way. The image tower is the
captioner's own class (``Blip2VisionModel``, pooled output + a linear projection) inside an
open_clip ``CLIP`` whose text tower and training loop are the reward CLIP's. The ITM model and the
captioner then start from this tower and keep it frozen, as BLIP-2 does.

One addition to CLIP's loss, ``clip.position_loss``: every output token must tell its own index.
A real ViT's patch tokens keep their place; ours, trained on the [CLS] token alone, blurred it,
and the Q-Former reading them then lost which cell holds what (a Q-Former trained on per-cell
labels alone read colour right in 0.46 of occupied cells; on tokens with the loss, 0.93).
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
    """``Blip2VisionModel`` as an open_clip image tower: pooled ([CLS]) output -> embedding.

    ``position_head`` reads each output token's own index back (``clip.position_loss``). CLIP
    training alone needs only the [CLS] token, and left the other tokens' positions blurred
    (linearly decodable 0.84): the Q-Former, which reads the tokens by attention, then cannot tell
    which cell holds what (BENCHMARKS.md, "What limits the truth of the tuned captions?"). The head is used only in stage 0.
    """

    def __init__(self, image_size: int, embed_dim: int):
        super().__init__()
        self.image_size = image_size
        self.model = Blip2VisionModel(vision_config(image_size))
        self.proj = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)
        self.position_head = nn.Linear(self.model.config.hidden_size, self.model.embeddings.num_positions)
        self.tokens: torch.Tensor | None = None  # [B, 1 + patches, D] of the last forward

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        self.tokens = out.last_hidden_state
        return self.proj(out.pooler_output)


def build_stage0(model_cfg: dict = STAGE0_CLIP):
    model = build_clip(model_cfg)
    model.visual = Blip2VisionTower(model_cfg["vision_cfg"]["image_size"], model_cfg["embed_dim"])
    return model
