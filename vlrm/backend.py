"""The generation-backend interface (``rollout.backend``): what a rollout actor needs from a generator.

A backend is a class ``Backend(cfg, device, policy=None)`` with

* ``generate(images, k, seed) -> vlrm.policy.Samples``: ``k`` captions per image, consecutive per
  image, with the log-probs of the distribution actually sampled and the policy version;
* optionally ``caption(images, decoding=..., num_beams=..., max_new_tokens=..., ...) -> list[str]``:
  deterministic captions (greedy or beam) for evaluation and checks;
* ``load_weights(state, version)``: swap in pushed weights between batches;
* ``weights_format``: the form it takes them in: ``"policy"`` (the names of
  :meth:`vlrm.policy.CaptionPolicy.trainable_state_dict`: peft LoRA tensors, value head) or
  ``"hf"`` (:meth:`~vlrm.policy.CaptionPolicy.hf_state_dict`: plain ``Blip2ForConditionalGeneration``
  names with LoRA merged into the projections it adapts, what an inference engine holds);
* ``version`` and ``name``.

The learner publishes weights in every form its rollout actors' backends take. Built in: ``hf``
(transformers ``generate``) and ``vllm`` (a vLLM engine in its own Python environment,
:mod:`actors.vllm_backend`); any ``"pkg.module:Class"`` / ``"file.py:Class"`` works too.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Protocol, Sequence, runtime_checkable

from vlrm.registry import resolve

__all__ = ["GenerationBackend", "BACKENDS", "backend_class"]

BACKENDS = {"hf": "actors.backends:HFBackend", "vllm": "actors.vllm_backend:VLLMBackend"}


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
