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

__all__ = ["init_ray", "localize_paths", "role_resources", "unplaceable", "check_before_start", "checked_placement",
           "answers", "answering_infos", "learner_lost", "actor_died", "PROJECT_ROOT"]

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


def unplaceable(cfg: RunConfig, placement: Mapping[str, Mapping[str, float] | None],
                nodes: list[dict]) -> list[tuple[str, str]]:
    """``(config key, reason)`` for each role whose actors no alive node can hold, or whose actors
    together ask for more than the cluster has: Ray would otherwise leave them pending for ever
    (the autoscaler's "no node type satisfies" message every half minute). ``nodes``: ``ray.nodes()``."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    total: dict[str, float] = {}
    for res in alive:
        for k, v in res.items():
            total[k] = total.get(k, 0.0) + float(v)
    problems, demand = [], {}
    roles = (("rollout", cfg.rollout, cfg.rollout.num_actors), ("reward", cfg.reward, cfg.reward.num_actors),
             ("learner", cfg.learner, cfg.learner.data_parallel_workers))
    for role, sec, count in roles:
        want = {"CPU": float(sec.num_cpus), "GPU": float(sec.num_gpus), **dict(placement.get(role) or {})}
        want = {k: v for k, v in want.items() if v > 0}
        for k, v in want.items():
            demand[k] = demand.get(k, 0.0) + v * count
        if not any(all(res.get(k, 0.0) >= v for k, v in want.items()) for res in alive):
            key = f"{role}.num_gpus" if want.get("GPU", 0) > max((r.get("GPU", 0.0) for r in alive), default=0) \
                else f"{role}.num_cpus" if want.get("CPU", 0) > max((r.get("CPU", 0.0) for r in alive), default=0) \
                else f"{role}.resources"
            problems.append((key, f"each {role} actor asks for {_fmt(want)}, and no node of this cluster has that "
                                  f"(nodes: {'; '.join(_fmt(r) for r in alive) or 'none alive'})"))
    for k in ("GPU",):
        if demand.get(k, 0) > total.get(k, 0.0) + 1e-9:
            problems.append((f"{k.lower()}s", f"the actors ask for {demand[k]:g} {k} in all, the cluster has "
                                               f"{total.get(k, 0.0):g}"))
    return problems


def _fmt(res: Mapping[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith(("node:", "memory", "object_store_memory"))}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(keep.items())) or "nothing"


def check_before_start(cfg: RunConfig, placement: Mapping[str, Mapping[str, float] | None], local: bool) -> None:
    """What would fail or hang after the models load, refused before: a missing vLLM environment,
    and actors that no node can hold. On a cluster this run did not start (one that may add nodes)
    the latter is a warning, and the actors wait."""
    import ray

    from vlrm.config_schema import ConfigError, rollout_backends

    if "vllm" in rollout_backends(cfg.rollout):
        from actors.vllm_backend import check_vllm_environment

        check_vllm_environment(cfg, local_cluster=not cfg.cluster.address)
    problems = unplaceable(cfg, placement, ray.nodes())
    if problems and local:  # nothing can add a node to a local cluster: fail now, not wait
        key, why = problems[0]
        raise ConfigError(f"'{key}': {why}" + "".join(f"; also '{k}': {w}" for k, w in problems[1:]), key=key)
    for key, why in problems:
        print(f"[vlrm] warning: '{key}': {why}; the actors wait until the cluster has it", flush=True)


def checked_placement(cfg: RunConfig, overrides: Mapping[str, Mapping[str, float]] | None,
                      local: bool) -> dict[str, dict | None]:
    """Each role's custom resources on the connected cluster (:func:`role_resources`), once
    :func:`check_before_start` has found nothing that would fail or hang."""
    import ray

    cres = ray.cluster_resources()
    placement = {role: role_resources(cfg, role, overrides, cres) for role in ("rollout", "reward", "learner")}
    check_before_start(cfg, placement, local)
    return placement


def answering_infos(actors: list) -> list[dict]:
    """``info()`` of each actor that still answers (a dead one is skipped)."""
    import ray

    out = []
    for a in actors:
        try:
            out.append(ray.get(a.info.remote(), timeout=60))
        except Exception:  # dead, or gone with its node
            continue
    return out


def answers(actor: Any, timeout: float = 30.0) -> bool:
    """Whether an actor answers a ``ping`` (False: dead, restarting or unreachable)."""
    import ray

    try:
        ray.get(actor.ping.remote(), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - every failure means the same here
        return False


def actor_died(e: BaseException) -> bool:
    """An actor (or the object it owned) was lost, as opposed to an error raised by our code."""
    import ray

    rex = ray.exceptions
    kinds = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                               "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))
    return isinstance(e, kinds)


def learner_lost(run_dir: Path, cause: BaseException, accounting: dict) -> Exception:
    """The one-line reason a run stops when its learner died, naming where it can continue from;
    the interrupted attempt's accounting is appended to ``accounting_interrupted.json``."""
    from vlrm.accounting import LearnerLost, record_interrupted
    from vlrm.run import latest_checkpoint

    record_interrupted(run_dir, accounting | {"cause": "learner"})
    ckpt = latest_checkpoint(run_dir)
    where = (f"its last checkpoint is {ckpt.name}: continue with 'vlrm train --resume {run_dir}'"
             if ckpt else "no checkpoint was written yet (learner.checkpoint_every)")
    return LearnerLost(f"the learner actor died ({type(cause).__name__}) at step {accounting['stopped_at_step']}, "
                       f"so the run stops; {where}", run_dir, ckpt, accounting)
