"""Image helpers every role shares: one image type for the models, and sharing one image's
features among the captions sampled for it."""
from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np
import torch

__all__ = ["to_pil", "unique_index", "unique_images", "check_pairing", "paired"]


def to_pil(image: Any):
    """A PIL RGB image from a PIL image, an ``HxWx3`` uint8 array or a ``3xHxW`` uint8 tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise TypeError(f"tensor images must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"array images must be uint8 [H, W, 3], got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}: use PIL images, uint8 arrays or tensors")


def unique_index(items: Sequence[Any], key: Any = None) -> tuple[list[Any], list[int]]:
    """``(unique, index)`` with ``items[i]`` equal to ``unique[index[i]]``, in order of first appearance.

    ``key(item)`` says which items are the same (default: the item itself, which must be
    hashable); images are compared by ``id`` (rollouts pass the same image object k times).
    """
    seen: dict[Hashable, int] = {}
    unique: list[Any] = []
    index: list[int] = []
    for item in items:
        k = item if key is None else key(item)
        j = seen.get(k)
        if j is None:
            j = seen[k] = len(unique)
            unique.append(item)
        index.append(j)
    return unique, index


def check_pairing(images: Sequence[Any], captions: Sequence[str], image_index: Sequence[int] | torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every caption has an image: one image per caption, or an
    ``image_index`` entry per caption."""
    if image_index is None and len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions (pass image_index to share images)")
    if image_index is not None and len(image_index) != len(captions):
        raise ValueError(f"image_index has {len(image_index)} entries for {len(captions)} captions")


def unique_images(images: Sequence[Any], image_index: Sequence[int] | torch.Tensor | None = None) -> tuple[list[Any], list[int]]:
    """``(unique, index)`` with ``images[i] is unique[index[i]]`` (expanded form).

    Without ``image_index``, images are deduplicated by object identity; with it, ``images`` are
    taken as already unique and ``image_index`` is validated and returned as a list.
    """
    if image_index is None:
        return unique_index(images, key=id)
    if isinstance(image_index, torch.Tensor):
        index = [int(i) for i in image_index.reshape(-1).tolist()]
    else:
        index = [int(i) for i in image_index]
    n = len(images)
    for i, j in enumerate(index):
        if not 0 <= j < n:
            raise IndexError(f"image_index[{i}] = {j} is out of range for {n} images")
    return list(images), index


def paired(images: Sequence[Any], captions: Sequence[str],
           image_index: Sequence[int] | torch.Tensor | None) -> tuple[list[str], list[Any], list[int]]:
    """A reward call's inputs checked and deduplicated: ``(captions, unique images, index)`` with
    caption ``i`` paired with ``unique[index[i]]``."""
    captions = list(captions)
    check_pairing(images, captions, image_index)
    uniq, index = unique_images(images, image_index)
    return captions, uniq, index
