"""The Karpathy split files of COCO, Flickr8k and Flickr30k as a data source (``data.source: karpathy``).

``data.root`` is the split file (``dataset_coco.json``, ``dataset_flickr8k.json``,
``dataset_flickr30k.json``) or a folder holding one; images are read from ``data.image_root``
(default: the ``images/`` folder beside the file, or the file's folder), joined with COCO's
``filepath`` (``train2014``/``val2014``) where the file has one. Splits are ``train``, ``restval``,
``val``, ``test``, or several joined with ``+`` (COCO users train on ``train+restval``).

The human ``sentences`` are kept as each image's references for evaluation
(``split.column("references", rows)``); training never reads them: the method is unsupervised.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vlrm.data import DatasetError, DataSource, FolderSplit

__all__ = ["KarpathySource", "KarpathySplit", "read_karpathy"]

SPLITS = ("train", "restval", "val", "test")


def _split_file(root: Path) -> Path:
    if root.is_file():
        return root
    found = sorted(root.glob("dataset_*.json")) if root.is_dir() else []
    if not found:
        raise DatasetError(f"data.source=karpathy: no Karpathy split file at {root} (expected dataset_coco.json, "
                           "dataset_flickr8k.json or dataset_flickr30k.json, or the path of one)")
    return found[0]


def read_karpathy(path: str | Path) -> list[dict]:
    """The ``images`` entries of a Karpathy split file, checked for the fields used here."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read the Karpathy split file {path}: {e}") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{path} is not a Karpathy split file: no 'images' list at the top level")
    for i, im in enumerate(images):
        if not isinstance(im, dict) or "filename" not in im or "split" not in im:
            raise DatasetError(f"{path}: images[{i}] lacks 'filename' or 'split'")
    return images


class KarpathySplit(FolderSplit):
    """The images of one or more Karpathy splits, in the file's order, with their references."""

    def __init__(self, entries: Sequence[dict], image_root: Path, name: str):
        self.path = image_root
        self.source = f"{image_root} ({name})"
        self.paths = np.array([str(image_root / e.get("filepath", "") / e["filename"]).encode() for e in entries])
        self.references = [[s.get("raw", " ".join(s.get("tokens", []))).strip() for s in e.get("sentences", [])]
                           for e in entries]
        self.ids = [e.get("cocoid", e.get("imgid", i)) for i, e in enumerate(entries)]

    def column(self, name: str, rows: Sequence[int] | None = None) -> list | None:
        values = {"references": self.references, "image_id": self.ids,
                  "path": [p.decode() for p in self.paths]}.get(name)
        if values is None:
            return None
        return list(values) if rows is None else [values[int(r)] for r in rows]


class KarpathySource(DataSource):
    name = "karpathy"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.file = _split_file(self.root)
        self.entries = read_karpathy(self.file)
        if cfg.image_root:
            self.image_root = Path(cfg.image_root)
        else:
            beside = self.file.parent / "images"
            self.image_root = beside if beside.is_dir() else self.file.parent

    def split(self, split: str) -> KarpathySplit:
        names = [s.strip() for s in split.split("+") if s.strip()]
        unknown = [s for s in names if s not in SPLITS]
        if unknown or not names:
            raise DatasetError(f"data.source=karpathy: unknown split {split!r}; splits are {', '.join(SPLITS)} "
                               "or several joined with '+' (train+restval)")
        entries = [e for e in self.entries if e["split"] in names]
        if not entries:
            raise DatasetError(f"{self.file} has no images in split {split!r}")
        return KarpathySplit(entries, self.image_root, split)
