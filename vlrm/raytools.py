"""Small helpers every Ray role uses: where it runs, its peak memory, CPU pinning, its actor
options, its dashboard metrics and its cache of recent results."""
from __future__ import annotations

import os
import socket
from collections import OrderedDict
from typing import Any, Mapping

from vlrm.memory import status_mib


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
    rss = status_mib("VmHWM")["VmHWM"]
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


def actor_options(section: Any, resources: Mapping[str, float] | None = None, **extra: Any) -> dict:
    """``.options(...)`` of a role's actors from its config section (CPUs, GPUs, restarts, task
    retries where the section has them) plus custom resources (e.g. ``{"rollout": 1}`` to land
    on the cluster.yaml rollout nodes) and role-specific ``extra`` options."""
    opts: dict[str, Any] = {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus}
    for key in ("max_restarts", "max_task_retries"):
        if hasattr(section, key):
            opts[key] = getattr(section, key)
    if resources:
        opts["resources"] = dict(resources)
    return opts | extra


class RoleMetrics:
    """``ray.util.metrics`` of one role, declared once: ``{name: (kind, description, extra)}`` with
    kind ``counter``, ``gauge`` or ``histogram`` (extra: the histogram's boundaries, or extra tag
    keys). Every metric is tagged with the role and actor; outside Ray every call is a no-op."""

    def __init__(self, role: str, actor: str, spec: Mapping[str, tuple]):
        self.tags = {"role": role, "actor": actor}
        self._m: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics as m

            if not ray.is_initialized():
                return
            for name, (kind, desc, *rest) in spec.items():
                extra = rest[0] if rest else None
                if kind == "histogram":
                    self._m[name] = m.Histogram(name, desc, boundaries=list(extra), tag_keys=("role", "actor"))
                else:
                    keys = ("role", "actor") + tuple(extra or ())
                    self._m[name] = (m.Counter if kind == "counter" else m.Gauge)(name, desc, tag_keys=keys)
        except Exception:  # metrics are best effort: a missing exporter never stops a role
            self._m = {}

    def inc(self, name: str, value: float) -> None:
        if name in self._m and value:  # Ray counters refuse 0
            self._m[name].inc(value, tags=self.tags)

    def set(self, name: str, value: float | None, **tags: str) -> None:
        if name in self._m and value is not None:
            self._m[name].set(float(value), tags=self.tags | tags)

    def observe(self, name: str, value: float | None) -> None:
        if name in self._m and value is not None:
            self._m[name].observe(max(float(value), 0.0), tags=self.tags)


class BatchCache:
    """The last ``size`` results by batch id, so that a retried call returns what the first one did."""

    def __init__(self, size: int):
        self.size = int(size)
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, batch_id: str | None) -> Any:
        return self._items.get(batch_id) if batch_id is not None else None

    def put(self, batch_id: str | None, value: Any) -> None:
        if batch_id is None:
            return
        self._items[batch_id] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
