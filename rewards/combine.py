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

:func:`build_reward` builds the combination from ``reward.components`` of the config. Built-in
components: ``clip`` (:class:`rewards.clip_reward.ClipReward`), ``itm``
(:class:`rewards.itm_reward.ItmReward`), ``ref`` (:class:`rewards.ref_lm.ReferenceLMReward`),
``bad``, ``repeat``, ``length`` (:mod:`rewards.penalties`), ``binding``
(:class:`rewards.binding.BindingReward`), ``phrase_itm`` (:class:`rewards.phrase_itm.PhraseItmReward`),
``grounded_lm`` (:class:`rewards.grounded_lm.GroundedLMReward`), ``claims``
(:class:`rewards.claims.ClaimsReward`).
A user's component is a factory named by import path, called with its options as keyword
arguments (plus ``device``, ``captioner_path`` and ``dtype`` where its signature names them)::

    # my_rewards.py
    def factory(target_words=12, device="cpu"):
        return lambda images, captions: torch.tensor([-abs(len(c.split()) - target_words) for c in captions])

    # config: reward.components.brevity: {target: "my_rewards.py:factory", weight: 0.5, target_words: 10}
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch

from vlrm.dtypes import open_clip_precision
from vlrm.images import unique_images
from vlrm.registry import load_target

__all__ = [
    "RewardError",
    "RewardFunction",
    "RewardOutput",
    "CombinedReward",
    "RewardContext",
    "build_reward",
    "BUILTIN_FACTORIES",
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
# Construction from config
# --------------------------------------------------------------------------------------


@dataclass
class RewardContext:
    """What a reward factory may need beside its own options: the captioner (the default
    reference LM), the device and the dtype of the reward models."""

    captioner_path: str
    device: str = "cpu"
    dtype: str = "float32"


def _clip(ctx: RewardContext, path: str, prompt_prefix: str = "", contrast: str = "none") -> Callable:
    from rewards.clip_reward import ClipReward

    return ClipReward(path, device=ctx.device, prompt_prefix=prompt_prefix, contrast=contrast,
                      precision=open_clip_precision(ctx.dtype))


def _itm(ctx: RewardContext, path: str) -> Callable:
    from rewards.itm_reward import ItmReward

    return ItmReward(path, device=ctx.device, dtype=ctx.dtype)


def _ref(ctx: RewardContext, lm_path: str | None = None) -> Callable:
    from rewards.ref_lm import ReferenceLMReward

    return ReferenceLMReward(lm_path=lm_path, captioner_path=ctx.captioner_path, device=ctx.device, dtype=ctx.dtype)


def _bad(ctx: RewardContext, phrases: Sequence[str] | None = None) -> Callable:
    from rewards.penalties import BadPhrasePenalty

    return BadPhrasePenalty(phrases=phrases)


def _repeat(ctx: RewardContext, ngram: int = 2, words: str = "all") -> Callable:
    from rewards.penalties import RepetitionPenalty

    return RepetitionPenalty(n=ngram, word_repeats=words)


def _length(ctx: RewardContext) -> Callable:
    from rewards.penalties import LengthReward

    return LengthReward()


def _binding(ctx: RewardContext, path: str, max_swaps: int = 4, groups: dict | None = None) -> Callable:
    from rewards.binding import BindingReward

    return BindingReward(path, device=ctx.device, groups=groups, max_swaps=max_swaps,
                         precision=open_clip_precision(ctx.dtype))


def _phrase_itm(ctx: RewardContext, path: str, reduce: str = "min", separators: Sequence[str] | None = None) -> Callable:
    from rewards.phrase_itm import PhraseItmReward

    return PhraseItmReward(path, device=ctx.device, dtype=ctx.dtype, reduce=reduce, separators=separators)


def _grounded_lm(ctx: RewardContext, path: str | None = None, negatives: int = 4, alpha: float = 1.0,
                 per_token: bool = False, max_token_gain: float | None = None) -> Callable:
    from rewards.grounded_lm import GroundedLMReward

    return GroundedLMReward(path or ctx.captioner_path, device=ctx.device, negatives=negatives, alpha=alpha,
                            per_token=per_token, max_token_gain=max_token_gain, dtype=ctx.dtype)


def _claims(ctx: RewardContext, path: str, false_cost: float = 1.0, unbound: bool = True) -> Callable:
    from rewards.claims import ClaimsReward

    return ClaimsReward(path, device=ctx.device, false_cost=false_cost, unbound=unbound, dtype=ctx.dtype)


BUILTIN_FACTORIES: dict[str, Callable[..., Callable]] = {
    "clip": _clip, "itm": _itm, "ref": _ref, "bad": _bad, "repeat": _repeat, "length": _length,
    "binding": _binding, "phrase_itm": _phrase_itm, "grounded_lm": _grounded_lm, "claims": _claims}


def _call_factory(factory: Callable, ctx: RewardContext, options: Mapping[str, Any], name: str) -> Callable:
    """``factory(**options)``, plus ``device=`` / ``captioner_path=`` / ``dtype=`` where it takes them."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = {k: getattr(ctx, k) for k in ("device", "captioner_path", "dtype") if k in params or takes_any}
    try:
        return factory(**extra, **options)
    except TypeError as e:
        raise RewardError(f"reward component '{name}': its factory {factory!r} does not take the options "
                          f"{sorted(options)} ({e})", component=name) from e


def build_reward(cfg: Any, captioner_path: str, device: str = "cpu") -> CombinedReward:
    """The :class:`CombinedReward` of a :class:`vlrm.config.RewardConfig`'s ``components``.

    Only components with a non-zero weight are built (models of zero-weighted terms are never
    loaded). A user's component (``target``) is imported here, in the process that scores: a
    Ray reward actor imports it itself. Every built component's ``name`` is its config key.

    Raises:
        PluginError: a target cannot be imported.
        RewardError: a factory failed or returned something that is not callable.
    """
    ctx = RewardContext(captioner_path=captioner_path, device=device, dtype=cfg.dtype)
    components: dict[str, Callable] = {}
    for name, comp in cfg.components.items():
        if comp.weight == 0:
            continue
        options = {k: v for k, v in dataclasses.asdict(comp).items() if k not in ("weight", "target", "options")}
        if name in BUILTIN_FACTORIES and getattr(comp, "target", None) is None:
            fn = BUILTIN_FACTORIES[name](ctx, **options)
        else:
            factory = load_target(comp.target, f"reward component '{name}' target")
            fn = _call_factory(factory, ctx, dict(comp.options), name)
        if not callable(fn):
            raise RewardError(f"the factory of reward component '{name}' returned a non-callable {fn!r}", component=name)
        try:
            fn.name = name
        except AttributeError:
            pass
        components[name] = fn
    return CombinedReward(components, cfg.weights())
