"""A local launch keeps every Ray listener on loopback: the GCS, the raylet, the object manager,
the dashboard and its agent, and every worker's gRPC server (checked on the live sockets, as
``ss -ltnp`` shows them, not by reading the code)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, psutil, ray
from actors.cluster import init_ray
from vlrm.config import from_dict

cfg = from_dict({"cluster": {"include_dashboard": True, "num_cpus": 2}})
init_ray(cfg)

@ray.remote(num_cpus=0)
class Ping:
    def pid(self):
        import os
        return os.getpid()

actors = [Ping.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
me = psutil.Process()
pids = {p.pid: p.name() for p in me.children(recursive=True)} | {me.pid: me.name()}
listening = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in pids:
        listening.append({"pid": c.pid, "process": pids[c.pid], "address": c.laddr.ip, "port": c.laddr.port})
ray.shutdown()
print("LISTENING " + json.dumps(listening))
"""


def test_a_default_local_launch_listens_on_loopback_only():
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("LISTENING "))
    listening = json.loads(line[len("LISTENING "):])
    processes = {s["process"] for s in listening}
    # the probe saw Ray's own servers, not an empty list
    assert len(listening) >= 5 and any("gcs" in p for p in processes) and any("raylet" in p for p in processes)
    exposed = [s for s in listening if s["address"] not in ("127.0.0.1", "::1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
