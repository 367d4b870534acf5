"""Reward components for VLRM: plain callables ``(images, captions) -> FloatTensor[N]``.

Re-exports are lazy, so ``import rewards.penalties`` does not import open_clip / transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClipReward": "rewards.clip_reward",
    "BindingReward": "rewards.binding",
    "ItmReward": "rewards.itm_reward",
    "GroundedLMReward": "rewards.grounded_lm",
    "ClaimsReward": "rewards.claims",
    "ReferenceLMReward": "rewards.ref_lm",
    "CombinedReward": "rewards.combine",
    "RewardError": "rewards.combine",
    "RewardFunction": "rewards.combine",
    "RewardOutput": "rewards.combine",
    "build_reward": "rewards.combine",
    "RewardContext": "rewards.combine",
    "BadPhrasePenalty": "rewards.penalties",
    "RepetitionPenalty": "rewards.penalties",
    "LengthReward": "rewards.penalties",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rewards' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
