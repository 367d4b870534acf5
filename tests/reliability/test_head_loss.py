"""Loss of the Ray head under a running ``vlrm train``: a head started with ``ray start`` (token
authentication on, every address 127.0.0.1), the driver joined to it, and the head's processes
killed with SIGKILL once the run has a checkpoint."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from learner.data_parallel import free_port
from tests.ray_nodes import stop_cluster

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def _wait_for(what: str, ok, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := ok()):
            return got
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver exited ({proc.returncode}) before {what}:\n{log.read_text() if log else ''}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout:.0f}s")


@pytest.fixture
def head(tmp_path):
    """A Ray head in its own process group, with a token of its own; yields its address and env."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vlrm-head-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(ROOT))
    start = subprocess.Popen([str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                              "--num-cpus=4", "--include-dashboard=false", f"--temp-dir={temp}"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        yield address, env, start
    finally:
        try:
            os.killpg(start.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        start.wait(timeout=30)
        stop_cluster(temp)  # anything of that head still alive
        shutil.rmtree(temp, ignore_errors=True)


def test_losing_the_head_stops_the_driver_with_a_resume_message_and_the_last_checkpoint_resumes(
        fault_cfg, tmp_path, head):
    """SIGKILL of every process of the head mid-run: the driver (outside the head's processes, as on
    another machine) stops within ``cluster.head_timeout_s`` and a margin, exit status 1, one line
    naming the step, the newest checkpoint and the resume command; the interrupted attempt's
    rollouts are recorded; ``vlrm train --resume`` on a new (local) cluster finishes the run."""
    from launch import main
    from vlrm.config import save_config
    from vlrm.run import latest_checkpoint

    address, env, start = head
    cfg = fault_cfg(400)
    cfg.cluster.address, cfg.cluster.head_timeout_s = address, 5.0
    cfg.learner.restarts_from_checkpoint = 0
    save_config(cfg, tmp_path / "run.yaml")
    run = tmp_path / "faults"
    _wait_for("head", lambda: start.poll() is None and _reachable(address), 120)
    log = tmp_path / "driver.err"  # a file, not a pipe: nothing the driver writes can block it
    with log.open("w") as err_file:
        driver = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--config", str(tmp_path / "run.yaml")],
                                  env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file)
        try:
            _wait_for("checkpoint", lambda: latest_checkpoint(run) if run.exists() else None, 300, driver, log)
            os.killpg(start.pid, signal.SIGKILL)  # the whole head: GCS, raylet, its workers and actors
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
    err = log.read_text()
    assert driver.returncode == 1, err
    last = latest_checkpoint(run)
    lost = [line for line in err.splitlines() if line.startswith("vlrm train: stopped: lost the Ray head")]
    assert lost, err
    port = address.rpartition(":")[2]  # Ray reports the GCS at the machine's address, not 127.0.0.1
    assert "GCS at " in lost[0] and f":{port} " in lost[0]
    assert last.name in lost[0] and f"vlrm train --resume {run}" in lost[0]
    attempt, = json.loads((run / "accounting_interrupted.json").read_text())
    assert attempt["cause"] == "head" and attempt["consistent"]
    assert attempt["generated"] == attempt["consumed"] + attempt["dropped_for_lag"] + attempt["lost_in_flight"]

    # a new head: this process's own local cluster, as 'vlrm train --resume' starts it
    steps = int(last.name[5:]) + 2
    assert main(["train", "--resume", str(run), f"--total_steps={steps}", "--cluster.address=null"]) == 0
    acc = json.loads((run / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["final_step"] == steps
    assert [a["cause"] for a in acc["interrupted_attempts"]] == ["head"]


def _reachable(address: str) -> bool:
    from actors.head_watch import gcs_reachable

    return gcs_reachable(address, timeout=1.0)


WATCHED = """
import socket, sys, time
from actors.head_watch import HeadWatch
from vlrm.accounting import Accounting, interrupted_accounting
server = socket.create_server(("127.0.0.1", 0))
address = "127.0.0.1:%d" % server.getsockname()[1]
acc = Accounting()
acc.generated, acc.scored, acc.consumed = 12, 8, 4
HeadWatch(address, 2.0, sys.argv[1], lambda: interrupted_accounting(acc, 7), every_s=0.2).start()
time.sleep(1.0)
server.close()  # the GCS goes; this thread stays blocked, as the driver's is inside Ray
time.sleep(300)
print("not stopped")
"""


def test_the_head_watch_ends_a_driver_blocked_inside_ray_with_the_resume_message(tmp_path):
    """The watch thread: once the GCS has refused connections for ``cluster.head_timeout_s`` (2 s
    here), the process ends with exit status 1 although its main thread is blocked, after
    recording the attempt's accounting; the line names the step, the wait and the checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000006").mkdir(parents=True)
    (run / "checkpoints" / "step_000006" / "state.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-c", WATCHED, str(run)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not stopped" not in proc.stdout
    line, = [x for x in proc.stderr.splitlines() if x.startswith("vlrm train: stopped: lost the Ray head")]
    assert "(cluster.head_timeout_s)" in line and "at step 7" in line
    assert "step_000006" in line and f"vlrm train --resume {run}" in line
    attempt, = json.loads((run / "accounting_interrupted.json").read_text())
    assert attempt["cause"] == "head" and attempt["stopped_at_step"] == 7
    assert attempt["unscored"] == 4 and attempt["scored_unconsumed"] == 4 and attempt["lost_in_flight"] == 8
