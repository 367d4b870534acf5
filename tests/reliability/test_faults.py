"""Faults of a running Ray system: the learner dying, a checkpoint cut off mid-write. (Rollout and
reward actors killed mid-run, repeatedly: tests/test_system.py.)"""
from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, namespace="vlrm-faults", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_learner_death_stops_the_run_with_a_resumable_message_and_the_last_checkpoint_resumes(
        fault_cfg, tmp_path, ray_local):
    """kill -9 of the learner mid-run: the driver stops with a one-line reason naming the last
    checkpoint and the resume command (no hang); a checkpoint left half-written is never taken
    for the last good one; ``--resume`` continues from the last good one to the end, with exact
    accounting."""
    ray = ray_local
    from actors.driver import DistributedEngine
    from learner.trainer import run_training
    from vlrm.run import latest_checkpoint

    killed = {}

    def on_step(engine, step, stats):
        if step == 5 and not killed:
            killed["at"] = step
            ray.kill(engine.learner, no_restart=True)

    cfg = fault_cfg(8)
    cfg.learner.restarts_from_checkpoint = 0  # stop instead of continuing by itself (the next test)
    with pytest.raises(RuntimeError, match=r"learner actor died.*at step 5.*step_00000\d.*vlrm train --resume") as e:
        run_training(cfg, DistributedEngine, on_step=on_step)
    assert killed == {"at": 5}
    run = tmp_path / "faults"
    assert str(run) in str(e.value)
    good = latest_checkpoint(run)
    # the checkpoint asked for after step 4 holds the learner's own step: 4, or later when the
    # async driver's next updates had already landed in the learner
    assert good.name in str(e.value) and good.name in ("step_000004", "step_000005", "step_000006")
    # a checkpoint cut off mid-write (the learner dies inside save): a .tmp folder, ignored
    half = good.with_name("step_000007.tmp")
    shutil.copytree(good, half)
    (half / "state.json").unlink()
    assert latest_checkpoint(run) == good

    again = run_training(fault_cfg(8), DistributedEngine,
                         resume=run)
    acc = json.loads((again / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["final_step"] == 8 and acc["steps"] == 8 - int(good.name[5:])
    assert latest_checkpoint(run).name == "step_000008"


def test_learner_death_is_survived_from_the_last_checkpoint_with_the_rollouts_in_flight_accounted(
        fault_cfg, tmp_path, ray_local):
    """kill -9 of the learner at step 5, twice in one run (at step 5, then at step 7 of the next
    attempt): each time the run continues from the newest checkpoint with new actors, the steps
    after it are taken again (each step once in metrics.jsonl), and each interrupted attempt
    accounts for every rollout it generated."""
    ray = ray_local
    from actors.driver import DistributedEngine
    from learner.trainer import run_training
    from vlrm.run import read_metrics

    kills = []

    def on_step(engine, step, stats):
        if (step, len(kills)) in ((5, 0), (7, 1)):
            kills.append(step)
            ray.kill(engine.learner, no_restart=True)

    run = run_training(fault_cfg(8), DistributedEngine,
                       on_step=on_step)
    assert kills == [5, 7]
    acc = json.loads((run / "accounting.json").read_text())
    assert acc["identity_holds"] and acc["final_step"] == 8 and acc["steps"] <= 2  # from step 6 (or later)
    lost = acc["interrupted_attempts"]
    assert [a["stopped_at_step"] for a in lost] == [5, 7]
    for a in lost:
        assert a["consistent"] and a["generated"] == a["consumed"] + a["dropped_for_lag"] + a["lost_in_flight"]
        assert a["consumed"] > 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, 9))
