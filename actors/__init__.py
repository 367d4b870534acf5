"""Ray actors of the distributed VLRM system.

- :mod:`actors.rollout`: :class:`~actors.rollout.RolloutActor` (policy copy + generation backend,
  ``generate(rows, batch_id)``, ``set_weights(ref, version)``) and the
  :class:`~actors.rollout.GenerationBackend` interface (:class:`~actors.rollout.HFBackend`).
- :mod:`actors.system`: :func:`~actors.system.run_distributed`, the driver that wires rollout
  actors, reward actors (:mod:`rewards.actor`), the bounded queue and the learner
  (:mod:`learner.actor`) together in ``async`` or ``sync`` mode.

The reward and learner actors live beside their roles' code (``rewards/actor.py``,
``learner/actor.py``).
"""
from actors.rollout import GenerationBackend, HFBackend, RolloutActor, RolloutWorker, make_backend

__all__ = ["GenerationBackend", "HFBackend", "RolloutActor", "RolloutWorker", "make_backend", "run_distributed"]


def run_distributed(*args, **kwargs):
    """See :func:`actors.system.run_distributed` (imported lazily)."""
    from actors.system import run_distributed as _run

    return _run(*args, **kwargs)
