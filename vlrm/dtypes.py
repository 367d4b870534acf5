"""The dtype names of the config (``float32``, ``bfloat16``, ``float16``) and what each library calls them."""
from __future__ import annotations

import torch

__all__ = ["DTYPES", "torch_dtype", "open_clip_precision"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# open_clip's "pure_*" precisions put every parameter in that dtype, as HF models load
_OPEN_CLIP = {"float32": "fp32", "bfloat16": "pure_bf16", "float16": "pure_fp16"}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a config name (a torch dtype or None passes through)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def open_clip_precision(name: str) -> str:
    """open_clip's ``precision`` argument for a config dtype name."""
    if name not in _OPEN_CLIP:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_OPEN_CLIP)}")
    return _OPEN_CLIP[name]
