"""The generation-backend interface (``rollout.backend``): what a rollout actor needs from a generator.

A backend is a class ``Backend(cfg, device, policy=None)`` with

* ``generate(images, k, seed) -> vlrm.policy.Samples``: ``k`` captions per image, consecutive per
  image, with the log-probs of the distribution actually sampled and the policy version;
* ``load_weights(state, version)``: swap in pushed weights between batches;
* ``weights_format``: the form it takes them in: ``"policy"`` (the names of
  :meth:`vlrm.policy.CaptionPolicy.trainable_state_dict`: peft LoRA tensors, value head) or
  ``"hf"`` (:meth:`~vlrm.policy.CaptionPolicy.hf_state_dict`: plain ``Blip2ForConditionalGeneration``
  names with LoRA merged into the projections it adapts, what an inference engine holds);
* ``version`` and ``name``.

The learner publishes weights in the form the configured backend takes. Built in: ``hf``
(transformers ``generate``); any ``"pkg.module:Class"`` / ``"file.py:Class"`` works too.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

from vlrm.registry import resolve

__all__ = ["GenerationBackend", "BACKENDS", "backend_class"]

BACKENDS = {"hf": "actors.backends:HFBackend"}


@runtime_checkable
class GenerationBackend(Protocol):
    name: str
    version: int
    weights_format: Literal["policy", "hf"]

    def generate(self, images: Sequence[Any], k: int, seed: int | None = None) -> Any: ...

    def load_weights(self, state: Mapping[str, Any], version: int) -> None: ...


def backend_class(name: str) -> type:
    """The backend class ``rollout.backend`` names."""
    return resolve(name, BACKENDS, "generation backend (rollout.backend)")
