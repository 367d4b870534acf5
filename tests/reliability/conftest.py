"""Shared by the fault tests: the small async run they break."""
from __future__ import annotations

import pytest


@pytest.fixture
def fault_cfg(tiny_world, tiny_captioner_dir, tiny_clip_dir, tmp_path):
    """``make(steps)``: the config of a small async run (2 rollout actors, 1 reward actor, a
    checkpoint every 2 steps) writing to ``tmp_path / "faults"``."""
    from vlrm.config import from_dict

    def make(steps: int):
        return from_dict({
            "seed": 0, "mode": "async", "output_dir": str(tmp_path), "run_name": "faults", "total_steps": steps,
            "data": {"root": str(tiny_world), "num_train": 64, "num_val": 32, "num_test": 32, "seed": 0,
                     "image_size": 64},
            "policy": {"model_path": str(tiny_captioner_dir), "value_head_hidden": 16},
            "rollout": {"num_actors": 2, "num_cpus": 0.5, "images_per_batch": 2, "samples_per_image": 2,
                        "max_new_tokens": 6},
            "reward": {"num_actors": 1, "num_cpus": 0.5, "batch_wait_s": 0.05,
                       "components": {"clip": {"weight": 1.0, "path": str(tiny_clip_dir)}}},
            "learner": {"lr": 1e-3, "checkpoint_every": 2, "num_cpus": 0.5, "queue_size": 4, "max_policy_lag": 2},
            "eval": {"evaluator_path": str(tiny_clip_dir), "val_every": 0, "gallery_size": 4, "max_new_tokens": 6},
            "cluster": {"include_dashboard": False}})

    return make
