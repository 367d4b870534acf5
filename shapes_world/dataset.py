"""Generate the shapes-world splits and store them as Parquet.

Each row: ``id``, ``image`` (PNG bytes), ``scene`` (ground truth as JSON), ``description``
(canonical full description), ``captions`` (biased human captions), ``alt_texts`` (complete
descriptions in varied phrasings).
"""
from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shapes_world.world import RADIUS, alt_text, full_description, human_caption, png_bytes, render, sample_scene

SCHEMA = pa.schema([
    ("id", pa.int64()),
    ("image", pa.binary()),
    ("scene", pa.string()),
    ("description", pa.string()),
    ("captions", pa.list_(pa.string())),
    ("alt_texts", pa.list_(pa.string())),
])
DEFAULT_SIZES = {"train": 20000, "val": 1000, "test": 1000}
# Bumped whenever the generator's output changes, so that an older world on disk is regenerated.
WORLD_FORMAT = "shapes-world/4"
# Share of human captions written by a rare thorough annotator: the full description (every
# object's size, colour, shape and position, and the background). As COCO has a few thorough
# captions among many short ones, the captioner can sample this mode, but it is not its greedy
# choice; RL has to find it and make it common.
P_THOROUGH = 0.05


def split_seed(seed: int, split: str) -> int:
    # Stable across Python runs (unlike hash()).
    return (seed * 1_000_003 + zlib.crc32(split.encode())) % 2**32


def generate_split(split: str, n: int, seed: int = 0, image_size: int = 64, n_captions: int = 5,
                   n_alt: int = 3, unique: bool | None = None, exclude: set[str] | None = None,
                   p_thorough: float = P_THOROUGH, small_radius: float = RADIUS["small"]) -> pa.Table:
    """Generate ``n`` scenes. ``unique`` (default: for val/test) rejects repeated descriptions, and
    ``exclude`` rejects descriptions already used elsewhere (e.g. in train). ``p_thorough``: the
    share of human captions replaced by the full description. ``small_radius``: a small object's
    radius as a share of its cell's side (the scenes and texts do not depend on it)."""
    if not 0 < small_radius < RADIUS["large"]:
        raise ValueError(f"small_radius must be above 0 and below the large objects' {RADIUS['large']}, got {small_radius}")
    radius = dict(RADIUS, small=small_radius)
    rng = np.random.default_rng(split_seed(seed, split))
    # Thorough captions draw from their own stream: scenes, images and alt-texts do not depend on
    # p_thorough (the reward and evaluator models were trained before it existed).
    thorough_rng = np.random.default_rng(split_seed(seed, split + "/thorough"))
    unique = split != "train" if unique is None else unique
    seen: set[str] = set(exclude or ())
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    while len(rows["id"]) < n:
        scene = sample_scene(rng)
        desc = full_description(scene)
        if unique and desc in seen:
            continue
        seen.add(desc)
        img = render(scene, image_size, jitter=rng, radius=radius)
        rows["id"].append(len(rows["id"]))
        rows["image"].append(png_bytes(img))
        rows["scene"].append(json.dumps(scene.to_dict()))
        rows["description"].append(desc)
        captions = [human_caption(scene, rng) for _ in range(n_captions)]
        rows["captions"].append([desc if thorough_rng.random() < p_thorough else c for c in captions])
        rows["alt_texts"].append([alt_text(scene, rng) for _ in range(n_alt)])
    return pa.table(rows, schema=SCHEMA)


# Rows per Parquet row group: a split is read one group at a time (vlrm.data.ParquetSplit).
ROW_GROUP_ROWS = 1000


def world_meta(seed: int, image_size: int, sizes: dict[str, int], small_radius: float = RADIUS["small"]) -> dict:
    """What ``meta.json`` says of a world; ``small_radius`` only where it is not the default, so
    that a default world's meta (and whether it is regenerated) is as it always was."""
    meta = {"seed": seed, "image_size": image_size, "sizes": {**DEFAULT_SIZES, **sizes}, "format": WORLD_FORMAT}
    return meta | ({"small_radius": small_radius} if small_radius != RADIUS["small"] else {})


def write_world(root: str | Path, seed: int = 0, image_size: int = 64, sizes: dict[str, int] | None = None,
                small_radius: float = RADIUS["small"]) -> dict[str, Path]:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = world_meta(seed, image_size, sizes or {}, small_radius)
    paths = {}
    for split in ("train", "val", "test"):
        table = generate_split(split, meta["sizes"][split], seed=seed, image_size=image_size, small_radius=small_radius)
        paths[split] = root / f"{split}.parquet"
        pq.write_table(table, paths[split], row_group_size=ROW_GROUP_ROWS)
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return paths


def ensure_world(root: str | Path, seed: int = 0, image_size: int = 64, sizes: dict[str, int] | None = None,
                 small_radius: float = RADIUS["small"]) -> Path:
    """Generate the world under ``root`` unless an identical one is already there."""
    root = Path(root)
    want = world_meta(seed, image_size, sizes or {}, small_radius)
    meta = root / "meta.json"
    if meta.exists() and json.loads(meta.read_text()) == want and all((root / f"{s}.parquet").exists() for s in DEFAULT_SIZES):
        return root
    write_world(root, seed, image_size, sizes, small_radius)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the shapes world as Parquet.")
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    p.add_argument("--val", type=int, default=DEFAULT_SIZES["val"])
    p.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    p.add_argument("--small-radius", type=float, default=RADIUS["small"],
                   help="a small object's radius as a share of its grid cell's side (large: %s)" % RADIUS["large"])
    a = p.parse_args(argv)
    try:
        paths = write_world(a.out, a.seed, a.image_size, {"train": a.train, "val": a.val, "test": a.test}, a.small_radius)
    except ValueError as e:
        p.error(str(e))
    for split, path in paths.items():
        print(f"{split}: {pq.read_metadata(path).num_rows} scenes -> {path}")


if __name__ == "__main__":
    main()
