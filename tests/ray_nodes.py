"""Ray nodes a test starts with ``ray start``, found and stopped by their temp dir (``ray stop``
would stop every Ray cluster on the machine, other users' included)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pids_of(tag: str) -> set[int]:
    """Processes whose command line contains ``tag`` (our cluster's temp dir), and their children."""
    cmd, parent = {}, {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd[int(p.name)] = (p / "cmdline").read_bytes()
            parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    pids = {pid for pid, c in cmd.items() if tag.encode() in c}
    grew = True
    while grew:
        kids = {pid for pid, pp in parent.items() if pp in pids} - pids
        pids |= kids
        grew = bool(kids)
    return pids


def stop_cluster(tag: str) -> None:
    """Stop the nodes this test started, and only them: SIGTERM, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
        pids = pids_of(tag) - {os.getpid()}
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists()}
            time.sleep(0.1)
