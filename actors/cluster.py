"""Starting or joining the Ray cluster of a run, and where each role's actors go.

:func:`init_ray` connects to the cluster named by ``cluster.address`` (or ``RAY_ADDRESS``, as
``ray job submit`` sets it) or starts a local one with the dashboard on ``cluster.dashboard_host``.
:func:`localize_paths` makes the config's relative paths absolute for actors whose working
directory differs. :func:`role_resources` pins a role to the node types of ``cluster.yaml``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

from vlrm.config import RunConfig

__all__ = ["init_ray", "localize_paths", "role_resources", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PATH_KEYS = (("data", "root"), ("data", "image_root"), ("policy", "model_path"), ("policy", "init_from"),
             ("eval", "evaluator_path"))
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info"]


def _required_cpus(cfg: RunConfig) -> float:
    return (cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.reward.num_actors * cfg.reward.num_cpus
            + cfg.learner.data_parallel_workers * cfg.learner.num_cpus)


def init_ray(cfg: RunConfig) -> bool:
    """Connect to or start Ray for this run; returns True when this call started it (and the run
    should shut it down at the end).

    * Ray already initialised (a test, a notebook): reused as it is.
    * ``cluster.address`` set (``auto``, ``host:6379``, ``ray://head:10001``): join that cluster in
      ``cluster.namespace``; a ``ray://`` (client) address also ships this project as the job's
      ``working_dir`` so that remote workers can import it.
    * ``RAY_ADDRESS`` in the environment (``ray job submit`` sets it): join that cluster; the job's
      own runtime environment applies.
    * otherwise a local cluster with the dashboard on ``cluster.dashboard_host``
      (``cluster.include_dashboard``) and ``cluster.num_cpus`` CPUs; when that is null, at least
      the CPUs the actors ask for (the actors then share the machine's cores). Ray 2.60's own
      servers listen on every interface whatever the node address (README, "Security defaults").
    """
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    common: dict[str, Any] = {"namespace": c.namespace, "log_to_driver": True}
    if c.address:
        kwargs = dict(common, address=c.address)
        if str(c.address).startswith("ray://"):
            kwargs["runtime_env"] = {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES}
        ray.init(**kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
    else:
        need = math.ceil(_required_cpus(cfg))
        num_cpus = c.num_cpus if c.num_cpus is not None else max(os.cpu_count() or 1, need)
        if num_cpus < need:
            print(f"[vlrm] warning: cluster.num_cpus={num_cpus} but the actors ask for {need} CPUs; "
                  "some actors will wait for resources", flush=True)
        info = ray.init(num_cpus=num_cpus, include_dashboard=c.include_dashboard, dashboard_host=c.dashboard_host,
                        **common)
        url = getattr(info, "dashboard_url", None)
        if c.include_dashboard and url:
            print(f"[vlrm] Ray dashboard: http://{url} (metrics: vlrm_*)", flush=True)
    return True


def localize_paths(cfg: RunConfig) -> RunConfig:
    """Make existing relative paths of the config absolute, so that actors whose working directory
    differs (local or same-filesystem clusters) find them. Under a ``working_dir`` runtime env
    (``ray job submit --working-dir``, ``ray://`` clients) paths stay relative to it."""
    import ray

    try:
        renv = ray.get_runtime_context().runtime_env or {}
    except Exception:
        renv = {}
    if renv.get("working_dir"):
        return cfg
    def absolute(v: str | None) -> str | None:
        return str(Path(v).resolve()) if v and not os.path.isabs(v) and Path(v).exists() else v

    for section, key in PATH_KEYS:
        sec = getattr(cfg, section)
        setattr(sec, key, absolute(getattr(sec, key)))
    for comp in cfg.reward.components.values():
        for key in ("path", "lm_path"):
            if hasattr(comp, key):
                setattr(comp, key, absolute(getattr(comp, key)))
        target = getattr(comp, "target", None)
        if target and ":" in target:  # a plugin file: every actor must find it
            where, _, attr = target.rpartition(":")
            if where.endswith(".py"):
                comp.target = f"{absolute(where)}:{attr}"
    return cfg


def role_resources(cfg: RunConfig, role: str, overrides: Mapping[str, Mapping[str, float]] | None,
                    cluster: Mapping[str, float] | None = None) -> dict | None:
    """Custom Ray resources a role's actors ask for (one actor: these amounts).

    In order: ``overrides[role]`` (the engine's ``resources=``); ``cfg.<role>.resources``
    when the config has such a key; else ``{role: 1}`` when the cluster advertises a resource named
    after the role (the node types of ``cluster.yaml`` do), which pins the role to its nodes;
    else none.
    """
    if overrides and overrides.get(role):
        return dict(overrides[role])
    res = getattr(getattr(cfg, role), "resources", None)
    if res:
        return dict(res)
    if cluster and cluster.get(role, 0) > 0:
        return {role: 1.0}
    return None
