"""Small helpers every Ray role uses."""
from __future__ import annotations

import os
import socket


def node_id() -> str:
    """The Ray node id of this process, or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # Ray missing or half shut down: the host name still identifies the node
        pass
    return socket.gethostname()


def peak_memory_mb(device: str) -> dict[str, float | None]:
    """This process's peak memory so far, in MiB: ``rss`` (the kernel's high-water mark, ``VmHWM``)
    and ``gpu`` (the most ``torch`` has held allocated on ``device``; None off CUDA)."""
    rss = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    rss = int(line.split()[1]) / 1024
    except OSError:  # no /proc (not Linux)
        pass
    gpu = None
    if str(device).startswith("cuda"):
        import torch

        gpu = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return {"rss": rss, "gpu": gpu}


def pin_to_cores(cores: list[int], key: str) -> list[int]:
    """Pin every thread of this process (and the threads it starts later) to ``cores``.

    Where roles share a node's cores, pinning gives each its own instead of time-sharing them all
    (Linux ``sched_setaffinity``). Ray has no CPU pinning of its own, so each actor calls this at
    start. Core ids are those of the node the actor runs on. ``key`` names the config entry in
    errors. Returns the cores the process now runs on (all of its allowed ones when ``cores`` is empty).
    """
    allowed = sorted(os.sched_getaffinity(0))
    if not cores:
        return allowed
    missing = sorted(set(cores) - set(allowed))
    if missing:
        raise ValueError(f"{key}={list(cores)}: core(s) {missing} are not available on node "
                         f"{socket.gethostname()} (this process may run on {allowed})")
    # sched_setaffinity(0) pins only the calling thread: Ray and torch have started others already.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))
