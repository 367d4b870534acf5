"""Data sources and lazily read splits: Parquet by row group within a byte budget, image folders
by path, the shapes world as a source with its ground truth, plugins by import path."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlrm.config import from_dict
from vlrm.data import DatasetError, FolderSplit, ImageDecodeError, ParquetSplit, open_source


def _png(value: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, 7)).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path, n: int, group: int):
    pq.write_table(pa.table({"image": [_png(i % 256, 32) for i in range(n)], "description": [f"d{i}" for i in range(n)]}),
                   path, row_group_size=group)
    return path


def test_parquet_split_reads_row_groups_within_its_budget(tmp_path):
    path = _parquet(tmp_path / "train.parquet", 200, 10)
    group_bytes = pq.ParquetFile(path).read_row_group(0, columns=["image"]).column("image").nbytes
    split = ParquetSplit(path, cache_mb=3.5 * group_bytes / 2**20)  # room for three row groups
    assert len(split) == 200
    rows = [199, 3, 57, 120, 3, 88, 11]
    images, kept, errors = split.images(rows)
    assert kept == rows and not errors
    assert [im.getpixel((0, 0))[0] for im in images] == [r % 256 for r in rows]
    assert len(split._cache) <= 3 and split._cached_bytes <= 3.5 * group_bytes
    assert split.column("description", [5, 150]) == ["d5", "d150"] and split.column("scene") is None
    with pytest.raises(IndexError, match="out of range"):
        split.images([200])


def test_folder_split_holds_paths_and_names_a_bad_file(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    split = FolderSplit(tmp_path)
    assert len(split) == 4 and split.column("path")[0].endswith("0.png")
    images, kept, errors = split.images(range(4), skip_bad=True)
    assert len(images) == 3 and kept == [0, 1, 2] and "broken.jpg" in errors[0]
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        split.images([3])
    (tmp_path / "a" / "1.png").unlink()  # gone since the listing: skipped and named, not a crash
    assert "1.png" in split.images([1], skip_bad=True)[2][0]


def test_sources_by_name_and_by_import_path(tmp_path, tiny_world):
    _parquet(tmp_path / "val.parquet", 20, 5)
    cfg = from_dict({"data": {"source": "parquet", "root": str(tmp_path)}}).data
    assert len(open_source(cfg).split("val")) == 20
    with pytest.raises(DatasetError, match=r"data.source=parquet: split 'test' not found"):
        open_source(cfg).split("test")
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "train" / "x.png").write_bytes(_png(1))
    folder = from_dict({"data": {"source": "folder", "root": str(tmp_path / "imgs")}}).data
    assert len(open_source(folder).split("train")) == 1
    (tmp_path / "my_source.py").write_text(
        "from vlrm.data import ParquetSource\n\nclass Tagged(ParquetSource):\n"
        "    def ground_truth(self, split, rows, captions):\n        return {'tagged': len(rows)}\n")
    plug = from_dict({"data": {"source": f"{tmp_path / 'my_source.py'}:Tagged", "root": str(tmp_path)}}).data
    src = open_source(plug)
    assert src.ground_truth(src.split("val"), [0, 1], ["a", "b"]) == {"tagged": 2}


def test_the_shapes_world_source_scores_its_ground_truth(tiny_world):
    cfg = from_dict({"data": {"source": "shapes", "root": str(tiny_world), "num_train": 64, "num_val": 32,
                              "num_test": 32}}).data
    src = open_source(cfg)
    src.prepare()  # the world there has these sizes: used as it is
    test = src.split("test")
    truth = test.column("description", [0, 1])
    perfect = src.ground_truth(test, [0, 1], truth)
    assert perfect["attribute_precision"] == 1.0 and perfect["attribute_recall"] > 0.9
    wrong = src.ground_truth(test, [1, 0], truth)  # each description against the other scene
    assert wrong["attribute_precision"] < 1.0


def test_the_shapes_source_never_writes_over_other_data(tmp_path):
    _parquet(tmp_path / "train.parquet", 4, 2)
    cfg = from_dict({"data": {"source": "shapes", "root": str(tmp_path)}}).data
    with pytest.raises(DatasetError, match="not a shapes world.*data.source"):
        open_source(cfg).prepare()
    assert pq.read_metadata(tmp_path / "train.parquet").num_rows == 4  # untouched


def _readme_block(marker: str) -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(marker)
    return text[start:text.index("```", start)]


def test_the_readmes_extension_examples_run(tmp_path, monkeypatch):
    """The README's reward and data-source examples, as written there."""
    import torch

    from rewards.combine import build_reward

    (tmp_path / "my_rewards.py").write_text(_readme_block("# my_rewards.py"))
    (tmp_path / "my_source.py").write_text(_readme_block("# my_source.py"))
    monkeypatch.chdir(tmp_path)
    cfg = from_dict({"reward": {"components": {"clip": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
                                               "brevity": {"target": "my_rewards.py:brevity", "weight": 0.5,
                                                           "target_words": 10}}}}).reward
    out = build_reward(cfg, "unused")([None], ["a b c"])
    assert out.components["brevity"].tolist() == [-7.0] and torch.isclose(out.total, torch.tensor([-3.5])).all()
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "train.csv").write_text("path\n" + "".join(f"{tmp_path / 'imgs' / f'{i}.png'}\n" for i in range(2)))
    src = open_source(from_dict({"data": {"source": "my_source.py:CsvImages", "root": str(tmp_path)}}).data)
    images, kept, errors = src.split("train").images([0, 1])
    assert len(images) == 2 and kept == [0, 1] and not errors


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header says side x side pixels (the data is a stub): over PIL's bomb limit."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_every_kind_of_image_is_decoded_or_named():
    import numpy as np

    from vlrm.data import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 20 wide x 30 high
    good = {
        "grayscale": _encoded(Image.new("L", (7, 5), 128)),
        "cmyk": _encoded(Image.new("CMYK", (7, 5), (0, 255, 255, 0)), "JPEG"),
        "rgba": _encoded(Image.new("RGBA", (7, 5), (255, 0, 0, 0))),
        "palette": _encoded(Image.new("RGB", (7, 5), (0, 0, 255)).convert("P")),
        "16-bit": _encoded(Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16))),
        "exif-rotated": _encoded(Image.new("RGB", (30, 20), (0, 255, 0)), "JPEG", exif=exif),
        "1x1": _encoded(Image.new("RGB", (1, 1), (9, 9, 9))),
    }
    out = {k: decode_image(v, k) for k, v in good.items()}
    assert all(im.mode == "RGB" for im in out.values())
    assert out["rgba"].getpixel((0, 0)) == (0, 0, 0)  # transparent on black
    assert out["16-bit"].getpixel((0, 0)) == (255, 255, 255) and out["grayscale"].getpixel((0, 0)) == (128,) * 3
    assert out["exif-rotated"].size == (20, 30) and out["1x1"].size == (1, 1)
    assert out["cmyk"].getpixel((3, 2))[0] > 200  # CMYK (0, 255, 255, 0) is red
    png = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)))
    bad = {"zero-byte": b"", "not-an-image": b"hello, world", "truncated": png[: len(png) // 2],
           "bomb": _bomb_png()}
    for name, data in bad.items():
        with pytest.raises(ImageDecodeError, match=f"at {name}"):
            decode_image(data, name)


def test_parquet_with_row_groups_too_big_for_the_cache_is_named(tmp_path):
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(64 * 1024) for _ in range(64)]  # incompressible, 64 KiB each
    pq.write_table(pa.table({"image": blobs}), tmp_path / "big.parquet", row_group_size=16)  # 1 MiB groups
    with pytest.warns(UserWarning, match=r"big.parquet: row groups of 1 MiB.*smaller row groups"):
        ParquetSplit(tmp_path / "big.parquet", cache_mb=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ParquetSplit(tmp_path / "big.parquet", cache_mb=64)  # the whole file fits: no warning
