"""The rollout role and the drivers that run the roles.

- :mod:`actors.rollout`: :class:`~actors.rollout.RolloutActor` (policy copy + generation backend,
  ``generate(rows, batch_id)``, ``set_weights(ref, version)``); :mod:`actors.backends`: the
  generation backends (interface :mod:`vlrm.backend`).
- :mod:`actors.driver`: the Ray engine, rollout actors -> reward actors (:mod:`rewards.actor`) ->
  bounded queue -> learner (:mod:`learner.actor`), in ``async`` or ``sync`` mode;
  :mod:`actors.cluster` starts or joins the Ray cluster.
- :mod:`actors.local`: the same roles in one process (``mode: local``).

Both engines run under the one run lifecycle of :mod:`learner.trainer`.
"""
