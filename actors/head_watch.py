"""Noticing that the Ray head is gone, and stopping the driver with a message that says how to go on.

When the head node (its GCS) is lost, the actors on it die with it and the driver's calls either
fail (the actor is unavailable) or wait: Ray's own clients retry the GCS for
``gcs_rpc_server_reconnect_timeout_s`` (60 s) and then end the process from C++, with a log line
that names no run and no checkpoint. :class:`HeadWatch` covers both:

* the driver asks :meth:`HeadWatch.reachable` before it takes a dead actor for a dead learner,
  and raises :meth:`HeadWatch.lost` (:class:`vlrm.accounting.HeadLost`) instead when the GCS
  does not answer: restarting actors on a cluster without a head cannot work;
* a daemon thread opens a TCP connection to the GCS every second; once none has succeeded for
  ``cluster.head_timeout_s`` it prints the same message and ends the process (exit status 1),
  since the main thread is then blocked inside Ray.

Either way the attempt's accounting is recorded first (``cause: head`` in
``accounting_interrupted.json``), and the message names the step, the newest checkpoint (whole or
absent: written to ``.tmp`` and renamed) and the command that resumes from it on a new head.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["HeadWatch", "watch_head", "gcs_reachable"]

HEAD_LOST_EXIT = 1


def gcs_reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class HeadWatch:
    """Watches the GCS at ``address`` for the run in ``run_dir``; ``accounting()`` gives the
    attempt's :func:`vlrm.accounting.interrupted_accounting` when the head is lost. ``timeout_s``
    0: no thread (:meth:`reachable` and :meth:`lost` still work)."""

    def __init__(self, address: str, timeout_s: float, run_dir: Path, accounting: Callable[[], dict],
                 every_s: float = 1.0):
        self.address, self.timeout_s, self.every_s = address, float(timeout_s), float(every_s)
        self.run_dir, self.accounting = Path(run_dir), accounting
        self._lost = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vlrm-head-watch", daemon=True)

    def start(self) -> "HeadWatch":
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def reachable(self) -> bool:
        return gcs_reachable(self.address)

    def lost(self, seconds: float | None = None):
        """The :class:`vlrm.accounting.HeadLost` of this run, its accounting recorded (once)."""
        from vlrm.accounting import HeadLost, record_interrupted
        from vlrm.run import latest_checkpoint

        with self._lock:
            if self._lost is None:
                acc = self.accounting() | {"cause": "head"}
                record_interrupted(self.run_dir, acc)
                ckpt = latest_checkpoint(self.run_dir)
                where = (f"its last checkpoint is {ckpt.name}: on a new head, continue with "
                         f"'vlrm train --resume {self.run_dir}'" if ckpt
                         else "no checkpoint was written yet (learner.checkpoint_every): start it again")
                waited = f" for {seconds:.0f}s (cluster.head_timeout_s)" if seconds is not None else ""
                self._lost = HeadLost(f"lost the Ray head: its GCS at {self.address} does not answer{waited}, at "
                                      f"step {acc['stopped_at_step']}, and the actors went with it; the run stops; "
                                      f"{where}", self.run_dir, ckpt, acc)
            return self._lost

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.every_s):
            if gcs_reachable(self.address, timeout=min(2.0, 2 * self.every_s)):
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok >= self.timeout_s and not self._stop.is_set():
                try:
                    message = f"vlrm train: stopped: {self.lost(time.monotonic() - last_ok)}"
                except Exception as e:  # noqa: BLE001 - the process must end all the same
                    message = f"vlrm train: stopped: lost the Ray head at {self.address} ({type(e).__name__}: {e})"
                print(message, file=sys.stderr, flush=True)
                os._exit(HEAD_LOST_EXIT)  # the main thread is blocked inside Ray; nothing else can end it


def watch_head(timeout_s: float, run_dir: Path, accounting: Callable[[], dict]) -> HeadWatch | None:
    """A started :class:`HeadWatch` on the GCS this driver is connected to (None for a ``ray://``
    client, whose server runs on the head and ends with it)."""
    import ray

    if ray.util.client.ray.is_connected():
        return None
    return HeadWatch(ray.get_runtime_context().gcs_address, timeout_s, run_dir, accounting).start()
