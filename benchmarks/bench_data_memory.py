"""Does a split's size set a process's memory? Peak RSS of a process that opens a training split
the way every role does (``open_source(cfg).split(name)``) and reads random batches from it, for
``folder`` and ``parquet`` sources of 1,000 / 10,000 / 100,000 images.

    python benchmarks/bench_data_memory.py --sizes 1000 10000 100000 --batches 300

Each measurement runs in a fresh process; the table gives its peak RSS (``VmHWM``) after the
imports, after opening the split and after reading the batches, and the ratio to the smallest size.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, sys
import numpy as np
from vlrm.config import from_dict
from vlrm.data import open_source

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
source, root, batches, cache_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
base = hwm()
split = open_source(from_dict({"data": {"source": source, "root": root, "cache_mb": cache_mb}}).data).split("train")
opened = hwm()
rng = np.random.default_rng(0)
for _ in range(batches):
    images, kept, errors = split.images(rng.integers(0, len(split), 16).tolist())
    assert len(images) == 16
print(json.dumps({"rows": len(split), "imports": base, "opened": opened, "read": hwm()}))
"""


def make(root: Path, n: int, kind: str, row_group: int = 1000) -> None:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(n)
    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()
    if kind == "folder":
        out = root / "train"
        for i in range(n):
            sub = out / f"{i // 1000:03d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{i}.png").write_bytes(png(i))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        root.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(root / "train.parquet", pa.schema([("image", pa.binary())])) as w:
            for s in range(0, n, 1000):
                w.write_table(pa.table({"image": [png(i) for i in range(s, min(n, s + 1000))]}),
                              row_group_size=row_group)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--cache-mb", type=float, default=64.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--row-group", type=int, default=1000, help="rows per Parquet row group")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vlrm-mem-"))
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; command: python benchmarks/bench_data_memory.py "
          f"{' '.join(sys.argv[1:])}; 64x64 noise PNGs (12 KB each), {a.batches} random batches of 16, data.cache_mb {a.cache_mb}, Parquet row groups of {a.row_group}")
    print(f"{'source':<8}{'images':>9}{'RSS imports (MiB)':>19}{'opened':>9}{'read':>9}{'read / smallest':>17}")
    for kind in ("folder", "parquet"):
        first = None
        for n in a.sizes:
            root = work / (f"{kind}-{n}" if kind == "folder" else f"{kind}-{n}-rg{a.row_group}")
            if not root.exists():
                make(root, n, kind, a.row_group)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            r = subprocess.run([sys.executable, "-c", PROBE, kind, str(root), str(a.batches), str(a.cache_mb)],
                               env=env, capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            first = first or m["read"]
            print(f"{kind:<8}{m['rows']:>9}{m['imports']:>19.0f}{m['opened']:>9.0f}{m['read']:>9.0f}"
                  f"{m['read'] / first:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
