"""What a default local launch listens on, checked on the live sockets (as ``ss -ltnp`` shows
them), not by reading the code: the dashboard's HTTP port on loopback only, token authentication
on, and beyond loopback exactly Ray's own servers, the set the README documents."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, os, psutil, ray
from actors.cluster import init_ray
from vlrm.config import from_dict

cfg = from_dict({"cluster": {"include_dashboard": True, "num_cpus": 4}})
init_ray(cfg)

@ray.remote(num_cpus=0)
class Ping:
    def pid(self):
        return os.getpid()

actors = [Ping.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
me = psutil.Process()
procs = {p.pid: p for p in me.children(recursive=True)} | {me.pid: me}
listening = []
for c in psutil.net_connections(kind="inet"):
    if c.status == psutil.CONN_LISTEN and c.pid in procs:
        p = procs[c.pid]
        listening.append({"address": c.laddr.ip, "port": c.laddr.port, "process": p.name(),
                          "cmdline": " ".join(p.cmdline()), "driver": c.pid == me.pid})
print("AUTH " + os.environ.get("RAY_AUTH_MODE", ""))
ray.shutdown()
print("LISTENING " + json.dumps(listening))
"""

# Ray 2.60's own servers, which listen beyond loopback whatever the node address (README,
# "Security defaults"): the GCS, the raylet, every worker's core-worker gRPC server (the driver's
# too), the dashboard agent, the runtime-env agent, the dashboard head's gRPC and the autoscaler
# monitor's metrics.
RAY_SERVERS = ("gcs_server", "raylet", "ray::", "dashboard/dashboard.py", "autoscaler/_private/monitor.py")


def test_a_default_local_launch_listens_where_the_readme_says():
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "AUTH token" in lines  # every Ray gRPC listener asks for the cluster's token
    listening = json.loads(next(l for l in lines if l.startswith("LISTENING "))[len("LISTENING "):])
    url = next(l for l in lines if "Ray dashboard: http://" in l).split("http://")[1].split()[0]
    assert url.startswith("127.0.0.1:")
    dashboard = [s for s in listening if s["port"] == int(url.split(":")[1])]
    assert dashboard and all(s["address"] == "127.0.0.1" for s in dashboard)
    exposed = [s for s in listening if s["address"] not in ("127.0.0.1", "::1")]
    assert any("gcs_server" in s["process"] for s in exposed)  # the probe saw Ray's servers
    unknown = [s for s in exposed if not s["driver"] and not any(k in s["process"] or k in s["cmdline"]
                                                                  for k in RAY_SERVERS)]
    assert not unknown, f"listening beyond loopback, not one of Ray's documented servers: {unknown}"
    assert all(s["process"] != "python" or s["driver"] or "dashboard" in s["cmdline"] or "monitor" in s["cmdline"]
               for s in exposed)
