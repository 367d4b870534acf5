"""Combining reward components into one scalar reward per caption.

A **reward function** is any callable ``(images, captions) -> FloatTensor[N]`` with a ``name``
attribute (see :class:`RewardFunction`): ``captions[i]`` is scored against ``images[i]``.
Components that score many captions of the same image may instead accept an
``image_index`` keyword, ``(images, captions, image_index=None)``, where ``images`` are the
*unique* images and ``image_index[i]`` is the position in ``images`` of caption ``i``'s image;
:class:`CombinedReward` passes ``image_index`` to components that accept it and expands the
images for the ones that do not.

:class:`CombinedReward` computes ``total = sum_name weight[name] * component[name]`` and
returns every component on its own (for per-reward logging). Components with weight 0 are not
computed at all (a zero-weighted CLIP is never run). A NaN or infinite value in any component
raises :class:`RewardError` naming the component and the caption: a broken reward never
silently becomes a training signal.

:func:`build_reward` builds the combination from :class:`vlrm.config.RewardConfig`. Built-in
component names: ``clip`` (:class:`rewards.clip_reward.ClipReward`), ``itm``
(:class:`rewards.itm_reward.ItmReward`), ``ref`` (:class:`rewards.ref_lm.ReferenceLMReward`),
``bad``, ``repeat``, ``length`` (:mod:`rewards.penalties`). More can be added with
:func:`register_reward`::

    def my_factory(cfg, captioner_path, device):
        return MyReward(device=device)          # a callable with a ``name``

    register_reward("mine", my_factory)
    # then: --reward.weights.mine=0.5
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

__all__ = [
    "RewardError",
    "RewardFunction",
    "RewardOutput",
    "CombinedReward",
    "build_reward",
    "register_reward",
    "registered_rewards",
    "unique_images",
]


class RewardError(RuntimeError):
    """A reward component failed or produced an invalid value (NaN/inf, wrong shape)."""

    def __init__(self, message: str, component: str | None = None, index: int | None = None):
        super().__init__(message)
        self.component = component
        self.index = index


@runtime_checkable
class RewardFunction(Protocol):
    """What a reward component is.

    ``__call__(images, captions) -> FloatTensor[N]`` with ``N == len(captions)``; ``images[i]``
    is the image of ``captions[i]``. Optionally it also accepts ``image_index=`` (``images``
    then holds unique images and ``image_index[i]`` indexes it). ``name`` is the logging key.
    Higher is better; penalties return values <= 0. Values must be finite.
    """

    name: str

    def __call__(self, images: Sequence[Any], captions: Sequence[str]) -> torch.Tensor: ...


@dataclass
class RewardOutput:
    """Result of :class:`CombinedReward`.

    Attributes:
        total: ``FloatTensor[N]`` (CPU, float32), the weighted sum.
        components: ``{name: FloatTensor[N]}``, unweighted values of every computed component
            (weight-0 components are absent).
        seconds: ``{name: wall seconds}`` spent in each component on this call.
        stats: extra per-call counters, e.g. ``{"clip/truncated": 2}`` (captions cut to the
            text encoder's context length), for the logs.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def check_pairing(images: Sequence[Any], captions: Sequence[str], image_index: Sequence[int] | torch.Tensor | None) -> None:
    """Raise ``ValueError`` unless every caption has an image: one image per caption, or an
    ``image_index`` entry per caption."""
    if image_index is None and len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions (pass image_index to share images)")
    if image_index is not None and len(image_index) != len(captions):
        raise ValueError(f"image_index has {len(image_index)} entries for {len(captions)} captions")


def unique_images(images: Sequence[Any], image_index: Sequence[int] | torch.Tensor | None = None) -> tuple[list[Any], list[int]]:
    """``(unique, index)`` with ``images[i] is unique[index[i]]`` (expanded form).

    Without ``image_index``, images are deduplicated by object identity (``id()``): rollouts pass
    the same image object k times. With ``image_index``, ``images`` are taken as already unique
    and ``image_index`` is validated and returned as a list.
    """
    if image_index is None:
        seen: dict[int, int] = {}
        unique: list[Any] = []
        index: list[int] = []
        for img in images:
            j = seen.get(id(img))
            if j is None:
                j = seen[id(img)] = len(unique)
                unique.append(img)
            index.append(j)
        return unique, index
    if isinstance(image_index, torch.Tensor):
        index = [int(i) for i in image_index.reshape(-1).tolist()]
    else:
        index = [int(i) for i in image_index]
    n = len(images)
    for i, j in enumerate(index):
        if not 0 <= j < n:
            raise IndexError(f"image_index[{i}] = {j} is out of range for {n} images")
    return list(images), index


def _accepts_image_index(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = sig.parameters.values()
    return any(p.name == "image_index" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class CombinedReward:
    """Weighted sum of reward components, each returned on its own.

    Args:
        components: ``{name: reward callable}``.
        weights: ``{name: weight}``. Every component needs a weight; a name with a non-zero
            weight needs a component. Weight-0 components are kept but never called.

    Call: ``(images, captions, image_index=None) -> RewardOutput``.

    Raises:
        RewardError: a component returned the wrong shape, or a NaN/inf value (the message
            names the component, the caption index and the caption).
    """

    name = "total"

    def __init__(self, components: Mapping[str, Callable], weights: Mapping[str, float]) -> None:
        missing = [n for n in components if n not in weights]
        if missing:
            raise ValueError(f"reward components without a weight: {missing}; weights given for {sorted(weights)}")
        orphans = [n for n, w in weights.items() if w != 0 and n not in components]
        if orphans:
            raise ValueError(f"non-zero reward weights without a component: {orphans}; components: {sorted(components)}")
        for n, w in weights.items():
            if not math.isfinite(float(w)):
                raise ValueError(f"reward weight '{n}' must be finite, got {w}")
        self.components = dict(components)
        self.weights = {n: float(w) for n, w in weights.items()}
        self._takes_index = {n: _accepts_image_index(c) for n, c in self.components.items()}

    @property
    def active(self) -> list[str]:
        """Names of the components that are computed (non-zero weight)."""
        return [n for n in self.components if self.weights[n] != 0]

    def __call__(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        image_index: Sequence[int] | torch.Tensor | None = None,
    ) -> RewardOutput:
        captions = list(captions)
        n = len(captions)
        if image_index is None and len(images) != n:
            raise ValueError(f"{len(images)} images for {n} captions: pass one image per caption, or image_index")
        if image_index is not None and len(image_index) != n:
            raise ValueError(f"image_index has {len(image_index)} entries for {n} captions")
        expanded: list[Any] | None = None
        total = torch.zeros(n, dtype=torch.float32)
        out: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        stats: dict[str, float] = {}
        for name in self.active:
            fn = self.components[name]
            t0 = time.perf_counter()
            try:
                if image_index is None:
                    value = fn(images, captions)
                elif self._takes_index[name]:
                    value = fn(images, captions, image_index=image_index)
                else:
                    if expanded is None:
                        uniq, idx = unique_images(images, image_index)
                        expanded = [uniq[j] for j in idx]
                    value = fn(expanded, captions)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward component '{name}' failed: {type(e).__name__}: {e}", component=name) from e
            seconds[name] = time.perf_counter() - t0
            value = self._check(name, value, captions)
            out[name] = value
            total += self.weights[name] * value
            last_truncated = getattr(fn, "last_truncated", None)
            if last_truncated is not None:
                stats[f"{name}/truncated"] = float(last_truncated)
        return RewardOutput(total=total, components=out, seconds=seconds, stats=stats)

    @staticmethod
    def _check(name: str, value: Any, captions: list[str]) -> torch.Tensor:
        n = len(captions)
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value, dtype=torch.float32)
            except Exception as e:
                raise RewardError(f"reward component '{name}' returned {type(value).__name__}, not a tensor", component=name) from e
        value = value.detach().to("cpu", torch.float32)
        if value.shape != (n,):
            raise RewardError(
                f"reward component '{name}' returned shape {tuple(value.shape)}, expected ({n},) (one value per caption)",
                component=name,
            )
        bad = (~torch.isfinite(value)).nonzero().flatten()
        if len(bad):
            i = int(bad[0])
            raise RewardError(
                f"reward component '{name}' returned {value[i].item()} for caption {i} ({captions[i]!r})"
                f"; {len(bad)} non-finite value(s) in the batch",
                component=name,
                index=i,
            )
        return value

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}={self.weights[n]:g}*{self.components[n]!r}" for n in self.active)
        return f"CombinedReward({parts})"


# --------------------------------------------------------------------------------------
# Registry and construction from config
# --------------------------------------------------------------------------------------

# factory(cfg: RewardConfig, captioner_path: str, device: str) -> reward callable
RewardFactory = Callable[[Any, str, str], Callable]


# reward.dtype -> open_clip precision ("pure_*": every parameter in that dtype, as HF models load)
_CLIP_PRECISION = {"float32": "fp32", "bfloat16": "pure_bf16", "float16": "pure_fp16"}


def _clip(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.clip_reward import ClipReward

    return ClipReward(cfg.clip_path, device=device, prompt_prefix=cfg.clip_prompt_prefix, contrast=cfg.clip_contrast,
                      precision=_CLIP_PRECISION[cfg.dtype])


def _itm(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.itm_reward import ItmReward

    return ItmReward(cfg.itm_path, device=device, dtype=cfg.dtype)


def _ref(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.ref_lm import ReferenceLMReward

    return ReferenceLMReward(lm_path=cfg.ref_lm_path, captioner_path=captioner_path, device=device, dtype=cfg.dtype)


def _bad(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.penalties import BadPhrasePenalty

    return BadPhrasePenalty(phrases=cfg.bad_phrases)


def _repeat(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.penalties import RepetitionPenalty

    return RepetitionPenalty(n=cfg.repeat_ngram, word_repeats=cfg.repeat_words)


def _length(cfg: Any, captioner_path: str, device: str) -> Callable:
    from rewards.penalties import LengthReward

    return LengthReward()


_REGISTRY: dict[str, RewardFactory] = {
    "clip": _clip,
    "itm": _itm,
    "ref": _ref,
    "bad": _bad,
    "repeat": _repeat,
    "length": _length,
}
_BUILTIN = frozenset(_REGISTRY)


def register_reward(name: str, factory: RewardFactory, *, overwrite: bool = False) -> None:
    """Make ``name`` usable as a key of ``reward.weights``.

    ``factory(cfg: RewardConfig, captioner_path: str, device: str)`` returns the reward
    callable; it is only called when the weight is non-zero. Re-registering a name raises
    unless ``overwrite=True``; built-in names can be overwritten the same way.
    """
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"reward name must be a non-empty string without '.' or '/', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for reward '{name}' is not callable: {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward '{name}' is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def registered_rewards() -> list[str]:
    """Names accepted as ``reward.weights`` keys."""
    return sorted(_REGISTRY)


def build_reward(cfg: Any, captioner_path: str, device: str = "cpu") -> CombinedReward:
    """The :class:`CombinedReward` described by a :class:`vlrm.config.RewardConfig`.

    Only components with a non-zero weight are built (models of zero-weighted terms are never
    loaded). Every built component's ``name`` is set to its weight key.

    Raises:
        ValueError: a weight key names no registered reward (the message lists the valid ones).
    """
    weights = dict(cfg.weights)
    unknown = [k for k in weights if k not in _REGISTRY]
    if unknown:
        raise ValueError(
            f"unknown reward component(s) {unknown} in reward.weights; valid names: {registered_rewards()}"
            " (add more with rewards.combine.register_reward)"
        )
    components: dict[str, Callable] = {}
    for name, w in weights.items():
        if w == 0:
            continue
        comp = _REGISTRY[name](cfg, captioner_path, device)
        if not callable(comp):
            raise TypeError(f"factory of reward '{name}' returned a non-callable {comp!r}")
        try:
            comp.name = name
        except AttributeError:
            pass
        components[name] = comp
    return CombinedReward(components, weights)
