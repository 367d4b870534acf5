"""Generation backends of the rollout actors (interface: :mod:`vlrm.backend`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from vlrm.backend import GenerationBackend, backend_class
from vlrm.policy import CaptionPolicy, Samples

__all__ = ["HFBackend", "make_backend"]


class HFBackend:
    """transformers ``generate`` through :meth:`CaptionPolicy.sample` (image features once per
    image). ``policy`` shares an existing policy (the single-process engine samples with the
    learner's own weights) instead of loading a copy."""

    name = "hf"
    weights_format = "policy"

    def __init__(self, cfg: Any, device: str = "cpu", policy: CaptionPolicy | None = None):
        self.cfg = cfg
        self.policy = policy if policy is not None else CaptionPolicy.from_config(cfg.policy, device=device)
        if policy is None:
            self.policy.train(False)

    @property
    def version(self) -> int:
        return int(self.policy.version)

    def generate(self, images: Sequence[Any], k: int, seed: int | None = None) -> Samples:
        r = self.cfg.rollout
        pv = self.policy.preprocess(list(images))
        return self.policy.sample(pv, k=k, max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=seed)

    def caption(self, images: Sequence[Any], **decoding: Any) -> list[str]:
        """Deterministic captions (:meth:`CaptionPolicy.caption` options)."""
        return self.policy.caption(self.policy.preprocess(list(images)), **decoding)

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        self.policy.load_trainable_state_dict(dict(state))
        self.policy.version = int(version)


def make_backend(cfg: Any, device: str = "cpu", policy: CaptionPolicy | None = None,
                 name: str | None = None) -> GenerationBackend:
    """The backend ``name`` (default ``rollout.backend``) names."""
    cls = backend_class(name or cfg.rollout.backend)
    return cls(cfg, device=device, policy=policy) if policy is not None else cls(cfg, device=device)
