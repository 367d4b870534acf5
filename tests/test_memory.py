"""What a process holds in memory, and handing freed heap pages back (vlrm/memory.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FREED = """
import json, numpy as np
from vlrm.memory import memory_now, trim_heap
base = memory_now()
xs = [np.ones(10_000) for _ in range(3_000)]  # 240 MB of 80 KB arrays: heap chunks, not mmaps
held = memory_now()
kept = xs[::10]  # every tenth stays: the freed ones are holes between them, not the heap's top
del xs
freed = memory_now()
trimmed = trim_heap()
print(json.dumps({"base": base, "held": held, "freed": freed, "after": memory_now(), "trimmed": trimmed}))
"""


def test_freed_heap_pages_stay_resident_until_trimmed_and_memory_now_tells_them_apart():
    """Freed small arrays stay in the process (anonymous RSS up, glibc's free heap up, the
    interpreter's blocks back down): allocator retention, not a leak; ``trim_heap`` returns them."""
    out = json.loads(subprocess.run([sys.executable, "-c", FREED], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout)
    base, held, freed, after = out["base"], out["held"], out["freed"], out["after"]
    assert held["anon_mib"] - base["anon_mib"] > 200 and held["heap_used_mib"] - base["heap_used_mib"] > 200
    assert freed["heap_used_mib"] - base["heap_used_mib"] < 40  # a tenth still held...
    assert freed["heap_free_mib"] > 150 and freed["anon_mib"] - base["anon_mib"] > 200  # ...the rest resident
    assert abs(freed["python_blocks"] - base["python_blocks"]) < 1000
    assert out["trimmed"] and freed["anon_mib"] - after["anon_mib"] > 150
    assert after["rss_mib"] >= after["anon_mib"] and after["shmem_mib"] is not None


def test_the_heap_trimmer_trims_once_its_interval_has_passed():
    from vlrm.memory import HeapTrimmer

    never = HeapTrimmer(0)
    never._last -= 10**6
    never.maybe()
    hourly = HeapTrimmer(3600)
    hourly.maybe()
    assert never.trims == 0 and hourly.trims == 0
    hourly._last -= 3600
    hourly.maybe()
    hourly.maybe()  # the interval starts again
    assert hourly.trims == 1


FIXED = """
import json, sys, numpy as np
from vlrm.memory import memory_now, set_mmap_threshold
fixed = set_mmap_threshold(int(sys.argv[1]))
big = np.ones(3_000_000); del big  # glibc alone now serves buffers up to 24 MB from its heaps
xs = [np.ones(40_000) for _ in range(1_000)]  # 320 KB each
kept = xs[::10]
del xs
print(json.dumps({"fixed": fixed, **memory_now()}))
"""


def test_a_fixed_mmap_threshold_returns_freed_tensor_sized_buffers_at_once():
    """After a large buffer was freed glibc serves 320 KB buffers from its heaps and keeps them
    resident when freed; with the threshold fixed at 256 KiB each has its own mapping and goes."""
    def run(kib: int) -> dict:
        return json.loads(subprocess.run([sys.executable, "-c", FIXED, str(kib)], cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout)

    default, fixed = run(0), run(256)
    assert not default["fixed"] and fixed["fixed"]
    assert default["heap_free_mib"] > 200 and fixed["heap_free_mib"] < 20
    assert default["anon_mib"] - fixed["anon_mib"] > 200
