"""The shapes world as a data source (``data.source: shapes``): generated at ``data.root`` on first
use, read as Parquet splits, and scored against its ground truth (attribute precision/recall
per kind of word, from the scene of every image)."""
from __future__ import annotations

import json
from typing import Sequence

from shapes_world.dataset import WORLD_FORMAT, ensure_world
from shapes_world.parse import attribute_scores
from shapes_world.world import Scene
from vlrm.data import DatasetError, ImageSplit, ParquetSource

__all__ = ["ShapesWorldSource"]


class ShapesWorldSource(ParquetSource):
    """The generated world: ``data.seed``, ``data.image_size`` and ``data.num_train/val/test`` say
    which one; a world at ``data.root`` written with other settings is generated again."""

    name = "shapes"

    def prepare(self) -> None:
        meta = self.root / "meta.json"
        before = meta.read_text() if meta.is_file() else None
        if not _is_world(before) and self.root.is_dir() and any(self.root.iterdir()):
            # never write over someone's data: only an empty folder or a world is (re)generated
            raise DatasetError(f"data.root {self.root} holds files that are not a shapes world (no shapes-world "
                               "meta.json): set data.source to 'parquet' or 'folder' for your own images, or point "
                               "data.root at an empty or new folder for the shapes world")
        sizes = {"train": self.cfg.num_train, "val": self.cfg.num_val, "test": self.cfg.num_test}
        ensure_world(self.root, seed=self.cfg.seed, image_size=self.cfg.image_size, sizes=sizes,
                     small_radius=self.cfg.small_radius)
        if meta.read_text() != before:
            print(f"[vlrm] generated the shapes world at {self.root} ({sizes}, seed {self.cfg.seed})", flush=True)

    def ground_truth(self, split: ImageSplit, rows: Sequence[int], captions: Sequence[str]) -> dict:
        scenes = split.column("scene", rows)
        if scenes is None:
            return {}
        return attribute_scores(captions, [Scene.from_dict(json.loads(s)) for s in scenes])


def _is_world(meta_text: str | None) -> bool:
    try:
        return meta_text is not None and str(json.loads(meta_text).get("format", "")).startswith(WORLD_FORMAT.split("/")[0])
    except (json.JSONDecodeError, AttributeError):
        return False
