"""Unlabelled image datasets: Parquet files with an ``image`` column of encoded bytes (the
shapes world writes these; any user can) or a folder of image files.

Bad input never passes silently: a corrupt or missing image raises ``ImageDecodeError`` naming the
file and row, and ``ImageDataset.decode_batch(..., skip_bad=True)`` skips such rows and counts them.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ImageDecodeError(ValueError):
    pass


class DatasetError(ValueError):
    pass


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageDecodeError(f"cannot decode image at {where}: {e}") from e


@dataclass
class ImageDataset:
    """Rows of (id, image bytes) plus optional ground truth (``scene``) for evaluation."""

    source: str
    table: pa.Table

    @staticmethod
    def open(path: str | Path) -> "ImageDataset":
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"dataset not found: {path}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")
            table = pa.table({"id": list(range(len(files))), "image": [p.read_bytes() for p in files],
                              "path": [str(p) for p in files]})
            return ImageDataset(str(path), table)
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"cannot read Parquet file {path}: {e}") from e
        if "image" not in table.column_names:
            raise DatasetError(f"{path} has no 'image' column (columns: {table.column_names})")
        if "id" not in table.column_names:
            table = table.append_column("id", pa.array(range(table.num_rows), pa.int64()))
        return ImageDataset(str(path), table)

    def __len__(self) -> int:
        return self.table.num_rows

    def where(self, row: int) -> str:
        if "path" in self.table.column_names:
            return f"{self.table.column('path')[row].as_py()} (row {row})"
        return f"{self.source} row {row}"

    def image(self, row: int) -> Image.Image:
        return decode_image(self.table.column("image")[row].as_py(), self.where(row))

    def images(self, rows: list[int], skip_bad: bool = False) -> tuple[list[Image.Image], list[int], list[str]]:
        """Decode rows. Returns (images, rows kept, errors); without ``skip_bad`` the first bad row raises."""
        out, kept, errors = [], [], []
        for r in rows:
            try:
                out.append(self.image(r))
                kept.append(r)
            except ImageDecodeError as e:
                if not skip_bad:
                    raise
                errors.append(str(e))
        return out, kept, errors

    def scenes(self) -> list[dict] | None:
        if "scene" not in self.table.column_names:
            return None
        return [json.loads(s) for s in self.table.column("scene").to_pylist()]

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()


def split_path(root: str | Path, split: str) -> Path:
    """``root/split.parquet`` if it exists, else ``root/split`` (a folder of images)."""
    root = Path(root)
    for cand in (root / f"{split}.parquet", root / split):
        if cand.exists():
            return cand
    raise DatasetError(f"split {split!r} not found under {root} (looked for {split}.parquet and {split}/)")
