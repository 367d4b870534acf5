"""Ray Data against the project's own row-addressed splits, for getting training images to rollout
actors: one epoch of a Parquet split delivered to ``--consumers`` actors, side by side in one run.

    pip install -e ".[bench]"          # Ray Data needs pandas
    python benchmarks/bench_data_streaming.py --rows 20000 --consumers 2

* ``ray-data``: ``ray.data.read_parquet(...).streaming_split(n, equal=True)``; each consumer actor
  iterates its shard in batches of ``--batch`` rows and decodes the images;
* ``rows``: what the rollout actors do. The driver sends each actor a list of ``--batch`` row
  numbers; the actor reads them from its own ``ParquetSplit`` (row-group cache of
  ``data.cache_mb``) and decodes them.

Both decode the same images to RGB (the decode is most of the work). Reported per method: the
epoch's wall time and images/s, each consumer's peak RSS, and the object store's peak use, sampled
during the epoch. What the table cannot show is the other half of the choice: a rollout batch is
named by its rows, so a retried batch (a restarted actor) re-reads exactly those rows, and the
learner decodes the same rows from its own copy of the split, so images never cross the object
store; a stream gives each image once, to one consumer.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_split(path: Path, rows: int, row_group: int = 1000) -> None:
    """A Parquet split of ``rows`` 64x64 PNG images of noise (about 12 KB each) in row groups of
    ``row_group`` rows."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(64):  # 64 distinct images, repeated: encoding is not what is measured
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    pq.write_table(pa.table({"image": [pngs[i % 64] for i in range(rows)]}), path, row_group_size=row_group)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Peak:
    """This process's peak RSS, sampled in a thread."""

    def __init__(self):
        self.peak = _rss_mib()
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mib())


def consumer_class():
    import ray

    @ray.remote(num_cpus=1)
    class Consumer:
        def __init__(self, path: str | None = None, cache_mb: float = 256.0):
            from vlrm.data import ParquetSplit

            self.split = ParquetSplit(path, cache_mb=cache_mb) if path else None
            self.peak = _Peak()
            self.images = 0

        def consume_stream(self, shard, batch: int) -> int:
            import io

            from PIL import Image

            for b in shard.iter_batches(batch_size=batch, batch_format="pyarrow"):
                for data in b.column("image").to_pylist():
                    Image.open(io.BytesIO(data)).convert("RGB")
                    self.images += 1
            return self.images

        def consume_rows(self, rows: list[int]) -> int:
            images, _, _ = self.split.images(rows)
            self.images += len(images)
            return self.images

        def peak_mib(self) -> float:
            return self.peak.peak

    return Consumer


def store_peak(stop: threading.Event, out: list) -> None:
    from ray._private.internal_api import memory_summary
    import re

    while not stop.wait(0.5):
        m = re.search(r"Plasma memory usage (\d+(?:\.\d+)?) MiB", memory_summary(stats_only=True))
        if m:
            out.append(float(m.group(1)))


def run(method: str, path: Path, rows: int, consumers: int, batch: int) -> dict:
    import ray

    Consumer = consumer_class()
    stop, store = threading.Event(), []
    if method == "ray-data":
        import ray.data

        actors = [Consumer.remote() for _ in range(consumers)]
        ray.get([a.peak_mib.remote() for a in actors])
        t0 = time.perf_counter()
        threading.Thread(target=store_peak, args=(stop, store), daemon=True).start()
        shards = ray.data.read_parquet(str(path), columns=["image"]).streaming_split(consumers, equal=True)
        counts = ray.get([a.consume_stream.remote(s, batch) for a, s in zip(actors, shards)])
    else:
        actors = [Consumer.remote(str(path)) for _ in range(consumers)]
        ray.get([a.peak_mib.remote() for a in actors])
        t0 = time.perf_counter()
        threading.Thread(target=store_peak, args=(stop, store), daemon=True).start()
        import numpy as np

        order = np.random.default_rng(0).permutation(rows).tolist()  # the sampler's shuffled epoch
        batches = [order[i:i + batch] for i in range(0, rows, batch)]
        pending = {}
        for i, b in enumerate(batches):  # one batch in flight per actor, as the async driver does
            a = actors[i % consumers]
            if a in pending:
                ray.get(pending.pop(a))
            pending[a] = a.consume_rows.remote(b)
        counts = ray.get(list(pending.values()))
        counts = ray.get([a.consume_rows.remote([]) for a in actors])
    wall = time.perf_counter() - t0
    stop.set()
    peaks = ray.get([a.peak_mib.remote() for a in actors])
    for a in actors:
        ray.kill(a)
    return {"method": method, "images": int(sum(counts)), "seconds": wall, "images_per_s": sum(counts) / wall,
            "consumer_peak_mib": max(peaks), "store_peak_mib": max(store) if store else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--consumers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--row-group", type=int, default=1000, help="rows per Parquet row group")
    a = p.parse_args()
    import ray

    ray.init(num_cpus=a.consumers + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.parquet"
        write_split(path, a.rows, a.row_group)
        results = [run(m, path, a.rows, a.consumers, a.batch) for m in ("rows", "ray-data")]
    ray.shutdown()
    print(f"\none epoch of {a.rows} images (row groups of {a.row_group}) to {a.consumers} consumer actors in batches "
          f"of {a.batch}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Ray {ray.__version__}")
    print(f"{'method':10s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'consumer peak RSS MiB':>22s} "
          f"{'object store peak MiB':>22s}")
    for r in results:
        print(f"{r['method']:10s} {r['images']:7d} {r['seconds']:8.1f} {r['images_per_s']:9.0f} "
              f"{r['consumer_peak_mib']:22.0f} {r['store_peak_mib']:22.1f}")


if __name__ == "__main__":
    main()
