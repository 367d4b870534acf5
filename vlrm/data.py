"""Unlabelled image data: sources (``data.source``) and their splits, read lazily.

A :class:`DataSource` names where a dataset's splits are and what it knows beyond the images:
``prepare()`` runs once in the driver (the shapes world generates itself there), ``split(name)``
opens one split, ``ground_truth(split, rows, captions)`` scores captions against what the source
knows of the images (the shapes world's scenes; nothing for plain images). Built in:

* ``parquet``: ``root/<split>.parquet``, tables with an ``image`` column of encoded bytes (and
  any other columns);
* ``folder``: ``root/<split>/``, a folder tree of image files;
* ``karpathy``: a Karpathy split file of COCO / Flickr8k / Flickr30k (:mod:`vlrm.karpathy`), whose
  human sentences are the references of evaluation;
* ``shapes``: the generated shapes world (:mod:`shapes_world.source`);
* any ``"pkg.module:Class"`` / ``"file.py:Class"`` taking the :class:`vlrm.config.DataConfig`.

A split is read lazily, so its size does not set a process's memory: a folder split keeps only
the file paths; a Parquet split reads the row groups that hold the requested rows and keeps the
most recently used ones within ``data.cache_mb`` of encoded bytes.

Bad input never passes silently: a corrupt or missing image raises :class:`ImageDecodeError`
naming the file and row, and ``images(rows, skip_bad=True)`` skips such rows and reports them.
"""
from __future__ import annotations

import io
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from vlrm.registry import resolve

__all__ = ["ImageDecodeError", "DatasetError", "decode_image", "ImageSplit", "ParquetSplit", "FolderSplit",
           "open_split", "split_path", "DataSource", "ParquetSource", "FolderSource", "SOURCES", "open_source",
           "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class ImageDecodeError(ValueError):
    pass


class DatasetError(ValueError):
    pass


def decode_image(data: bytes, where: str) -> Image.Image:
    """An RGB image from encoded bytes: EXIF orientation applied; grayscale, palette, RGBA (on
    black), CMYK and 16-bit images converted. Empty, truncated or non-image bytes and images over
    PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) raise :class:`ImageDecodeError`
    naming ``where``."""
    if not data:
        raise ImageDecodeError(f"cannot decode image at {where}: the file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            flat = Image.new("RGB", img.size)
            flat.paste(img, mask=img.getchannel("A"))
            return flat
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot decode image at {where}: {type(e).__name__}: {e}") from e


class ImageSplit:
    """One split's rows: ``len()``, ``images(rows)``, ``column(name, rows)``; subclasses read the bytes."""

    source: str

    def __len__(self) -> int:
        raise NotImplementedError

    def where(self, row: int) -> str:
        return f"{self.source} row {row}"

    def encoded(self, rows: Sequence[int]) -> list[bytes | OSError]:
        """The encoded image of each row, or the ``OSError`` that reading it raised."""
        raise NotImplementedError

    def column(self, name: str, rows: Sequence[int] | None = None) -> list | None:
        """Values of a metadata column for ``rows`` (all rows with None); None when there is none."""
        return None

    def image(self, row: int) -> Image.Image:
        return self.images([row])[0][0]

    def images(self, rows: Sequence[int], skip_bad: bool = False) -> tuple[list[Image.Image], list[int], list[str]]:
        """Decode rows. Returns (images, rows kept, errors); without ``skip_bad`` the first bad row raises."""
        out, kept, errors = [], [], []
        rows = [int(r) for r in rows]
        for r, data in zip(rows, self.encoded(rows)):
            try:
                if isinstance(data, OSError):
                    raise ImageDecodeError(f"cannot read image at {self.where(r)}: {data}")
                out.append(decode_image(data, self.where(r)))
                kept.append(r)
            except ImageDecodeError as e:
                if not skip_bad:
                    raise
                errors.append(str(e))
        return out, kept, errors


class ParquetSplit(ImageSplit):
    """A Parquet file with an ``image`` column, read by row group through a bounded cache."""

    def __init__(self, path: str | Path, cache_mb: float = 256.0):
        self.path = Path(path)
        self.source = str(path)
        try:
            self._file = pq.ParquetFile(self.path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(f"cannot read Parquet file {path}: {e}") from e
        names = self._file.schema_arrow.names
        if "image" not in names:
            raise DatasetError(f"{path} has no 'image' column (columns: {names})")
        self.columns = list(names)
        meta = self._file.metadata
        self._starts = [0]
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._budget = int(cache_mb * 2**20)
        self._cache: OrderedDict[int, pa.Array] = OrderedDict()
        self._cached_bytes = 0
        groups = meta.num_row_groups
        total = sum(meta.row_group(g).total_byte_size for g in range(groups))
        if groups > 1 and total > self._budget and total / groups > self._budget / 16:
            # a shuffled batch of 16 images reads about 16 row groups: when those do not fit in the
            # cache, every image costs a whole row group (measured: BENCHMARKS.md, "Ray Data")
            import warnings

            warnings.warn(f"{path}: row groups of {total / groups / 2**20:.0f} MiB on average, and a shuffled "
                          f"batch reads one per image, more than data.cache_mb={cache_mb:g} holds; rewrite it with "
                          "smaller row groups (pyarrow row_group_size, e.g. 64 rows of photos) or raise "
                          "data.cache_mb", stacklevel=2)

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is out of range for {self.source} ({len(self)} rows)")
        import bisect

        g = bisect.bisect_right(self._starts, row) - 1
        return g, row - self._starts[g]

    def _group(self, g: int) -> pa.Array:
        if g in self._cache:
            self._cache.move_to_end(g)
            return self._cache[g]
        col = self._file.read_row_group(g, columns=["image"]).column("image").combine_chunks()
        self._cache[g] = col
        self._cached_bytes += col.nbytes
        while self._cached_bytes > self._budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes
        return col

    def encoded(self, rows: Sequence[int]) -> list[bytes | OSError]:
        out: list[bytes | OSError] = []
        for r in rows:
            g, i = self._locate(int(r))
            out.append(self._group(g)[i].as_py())
        return out

    def column(self, name: str, rows: Sequence[int] | None = None) -> list | None:
        if name not in self.columns:
            return None
        values = self._file.read(columns=[name]).column(name)
        return values.to_pylist() if rows is None else values.take(pa.array(list(rows), pa.int64())).to_pylist()


def _list_images(root: Path, chunk: int = 4096) -> np.ndarray:
    """The image files under ``root``, relative to it, sorted, as one fixed-width byte array
    (UTF-8): read with ``os.scandir`` a few thousand names at a time, so listing 100,000 files
    never holds 100,000 Python strings at once."""
    chunks, names, stack = [], [], [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                name = os.path.join(rel, e.name) if rel else e.name
                if e.is_dir():
                    stack.append(name)
                elif os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
                    names.append(name.encode())
                    if len(names) >= chunk:
                        chunks.append(np.array(names))
                        names = []
    if names:
        chunks.append(np.array(names))
    if not chunks:
        return np.array([], dtype="S1")
    width = max(c.dtype.itemsize for c in chunks)
    return np.sort(np.concatenate([c.astype(f"S{width}") for c in chunks]))  # UTF-8 byte order = text order


class FolderSplit(ImageSplit):
    """A folder tree of image files; only the sorted paths (relative to the folder) are held."""

    _root = ""  # what ``paths`` are relative to ("": they are whole paths, as of_files and Karpathy lists)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.source = str(path)
        self._root = str(self.path)
        self.paths = _list_images(self.path)
        if not len(self.paths):
            raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {path}")

    @classmethod
    def of_files(cls, paths: Sequence[str | Path], source: str) -> "FolderSplit":
        """A split of the given image files, in that order."""
        split = cls.__new__(cls)
        split.path, split.source = Path(source), str(source)  # paths are whole: the class's _root ""
        split.paths = np.array([str(p).encode() for p in paths]) if len(paths) else np.array([], dtype="S1")
        if not len(split.paths):
            raise DatasetError(f"no images listed in {source}")
        return split

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, row: int) -> str:
        return f"{self.path_of(row)} (row {row})"

    def path_of(self, row: int) -> str:
        rel = self.paths[int(row)].decode()
        return os.path.join(self._root, rel) if self._root else rel

    def encoded(self, rows: Sequence[int]) -> list[bytes | OSError]:
        out: list[bytes | OSError] = []
        for r in rows:
            try:
                out.append(Path(self.path_of(r)).read_bytes())
            except OSError as e:  # deleted or unreadable since the listing
                out.append(e)
        return out

    def column(self, name: str, rows: Sequence[int] | None = None) -> list | None:
        if name != "path":
            return None
        return [self.path_of(r) for r in (range(len(self)) if rows is None else rows)]


def split_path(root: str | Path, split: str) -> Path:
    """``root/split.parquet`` if it exists, else ``root/split`` (a folder of images)."""
    root = Path(root)
    for cand in (root / f"{split}.parquet", root / split):
        if cand.exists():
            return cand
    raise DatasetError(f"split {split!r} not found under {root} (looked for {split}.parquet and {split}/)")


def open_split(path: str | Path, cache_mb: float = 256.0) -> ImageSplit:
    """A Parquet file or an image folder as a lazily read split."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    return FolderSplit(path) if path.is_dir() else ParquetSplit(path, cache_mb)


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


class DataSource:
    """Splits under ``data.root`` (``root/<split>.parquet`` or ``root/<split>/``). Subclasses add
    ``prepare`` (driver-side, once) and ``ground_truth`` (what captions are scored against)."""

    name = "files"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.root = Path(cfg.root)

    def prepare(self) -> None:
        """Make the data ready (the driver calls this once before any role opens a split)."""

    def split_location(self, split: str) -> Path:
        return split_path(self.root, split)

    def split(self, split: str) -> ImageSplit:
        return open_split(self.split_location(split), self.cfg.cache_mb)

    def ground_truth(self, split: ImageSplit, rows: Sequence[int], captions: Sequence[str]) -> dict:
        """Scores of ``captions[i]`` against what the source knows of image ``rows[i]``; {} by default."""
        return {}


class ParquetSource(DataSource):
    name = "parquet"

    def split_location(self, split: str) -> Path:
        path = self.root / f"{split}.parquet"
        if not path.is_file():
            raise DatasetError(f"data.source=parquet: split {split!r} not found: {path}")
        return path


class FolderSource(DataSource):
    name = "folder"

    def split_location(self, split: str) -> Path:
        path = self.root / split
        if not path.is_dir():
            raise DatasetError(f"data.source=folder: split {split!r} not found: {path} is not a folder")
        return path


SOURCES = {"parquet": "vlrm.data:ParquetSource", "folder": "vlrm.data:FolderSource",
           "karpathy": "vlrm.karpathy:KarpathySource", "shapes": "shapes_world.source:ShapesWorldSource"}


def open_source(cfg: Any) -> DataSource:
    """The source ``data.source`` names, built from the data config."""
    return resolve(cfg.source, SOURCES, "data source")(cfg)
