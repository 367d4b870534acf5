"""Run configuration: one typed dataclass tree, grouped by role.

The tree (``RunConfig`` -> ``data``, ``policy``, ``rollout``, ``reward``, ``learner``,
``eval``, ``cluster``) is the single source of truth for every setting; each field carries
its default and a one-line comment saying what it does (``--help`` prints them).

Sources, applied in order, each validated against the dataclass annotations:

1. the defaults below;
2. a YAML file (``--config file.yaml``), which may set any subset of keys;
3. command-line overrides, dotted keys: ``--rollout.num_actors=3``,
   ``--rollout.num_actors 3``, ``rollout.num_actors=3``; values are parsed as YAML scalars
   or flow collections (``--reward.bad_phrases='["a", "b"]'``, ``true``/``false``,
   ``null``), except ``str`` fields, which take the text as it is. A bare ``--flag`` sets a
   bool field to true. ``dict`` fields (``reward.weights``) merge key by key
   (``--reward.weights.itm=1.0`` leaves the other weights alone).

Errors raise :class:`ConfigError` naming the full dotted key and where it came from (file and
line, or the command-line argument): unknown keys with the closest valid key, wrong types with
the expected type and the value, ``Literal`` fields with their allowed values.

``save_config`` writes the resolved tree back as YAML (with the field comments), and
``load_config`` reads it back to an equal object.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import sys
import time
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

__all__ = [
    "ConfigError",
    "RunConfig",
    "DataConfig",
    "PolicyConfig",
    "RolloutConfig",
    "RewardConfig",
    "LearnerConfig",
    "EvalConfig",
    "ClusterConfig",
    "load_config",
    "parse_cli",
    "split_cli",
    "from_dict",
    "to_dict",
    "to_flat_dict",
    "save_config",
    "dump_yaml",
    "resolve",
    "validate",
    "run_dir",
    "format_help",
    "field_docs",
]


# --------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    root: str = "data/shapes"  # folder holding the dataset's Parquet splits
    train_split: str = "train"  # split the rollout actors draw training images from
    val_split: str = "val"  # split used for periodic validation during training
    test_split: str = "test"  # split used for the final before/after evaluation
    image_size: int = 64  # side of the square images, in pixels (shapes world generator)
    seed: int = 0  # seed of the shapes-world generator
    num_train: int = 20000  # number of training scenes the generator writes
    num_val: int = 1000  # number of validation scenes the generator writes
    num_test: int = 1000  # number of test scenes the generator writes


@dataclass
class PolicyConfig:
    model_path: str = "models/shapes/captioner"  # BLIP-2 captioner: local directory or Hugging Face hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter/compute dtype of the policy
    train_qformer: bool = True  # train the Q-Former
    train_query_tokens: bool = True  # train the learned query tokens
    train_projection: bool = True  # train the Q-Former -> LM language projection
    train_vision: bool = False  # train the vision tower (frozen in the paper)
    lora_r: int = 8  # LoRA rank on the language model; 0 disables LoRA (LM base stays frozen)
    lora_alpha: int = 16  # LoRA scaling numerator (scale = lora_alpha / lora_r)
    lora_dropout: float = 0.0  # dropout on the LoRA branch
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # LM module names that get LoRA adapters
    value_head_hidden: int = 128  # hidden width of the value-head MLP
    value_head_use_query: bool = False  # also feed the pooled query embeddings to the value head
    value_head_detach: bool = True  # True: the value loss trains only the value head, not Q-Former/LoRA (False shares them; its large early value loss then slowed learning several-fold on the shapes world)
    disable_dropout: bool = True  # keep the BLIP-2 modules in eval mode so sampled and learner log-probs agree


@dataclass
class RolloutConfig:
    num_actors: int = 2  # number of rollout (generation) actors
    num_cpus: float = 1.0  # CPUs reserved per rollout actor
    num_gpus: float = 0.0  # GPUs reserved per rollout actor (fractions share a GPU)
    nice: int = 0  # os.nice() increment of rollout actor processes (0-19): where roles share CPU cores, >0 lets the learner go first
    cpu_affinity: list[int] = field(default_factory=list)  # CPU core ids each rollout actor is pinned to on its node; empty: no pinning
    backend: Literal["hf", "vllm"] = "hf"  # generation backend: transformers generate or vLLM
    images_per_batch: int = 16  # images per rollout batch
    samples_per_image: int = 4  # captions sampled per image (k); image features are computed once per image
    max_new_tokens: int = 40  # maximum caption length in tokens when sampling
    min_new_tokens: int = 1  # minimum caption length in tokens when sampling
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # top-k sampling; 0 disables
    top_p: float = 1.0  # nucleus sampling threshold; 1.0 disables
    max_restarts: int = 3  # times Ray restarts a dead rollout actor (-1: forever)
    max_task_retries: int = 3  # times Ray retries a rollout call on a restarted actor (-1: forever)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources per actor, e.g. {rollout: 1} (cluster.yaml node types)


@dataclass
class RewardConfig:
    num_actors: int = 1  # number of reward-model actors
    num_cpus: float = 1.0  # CPUs reserved per reward actor
    num_gpus: float = 0.0  # GPUs reserved per reward actor (fractions share a GPU)
    clip_path: str = "models/shapes/reward_clip"  # CLIP reward model: local directory, or open_clip '<pretrained>/<model>' name
    itm_path: str = "models/shapes/reward_itm"  # BLIP2-ITM reward model: local directory or hub id
    ref_lm_path: Optional[str] = None  # reference LM for the 'ref' term; null: the frozen base captioner's LM
    clip_prompt_prefix: str = ""  # text prepended to each caption before CLIP scores it
    clip_contrast: Literal["none", "batch"] = "none"  # 'batch': CLIP reward = log-prob of retrieving the own image among the batch's images
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # parameter dtype of the CLIP, ITM and reference-LM reward models (bfloat16 on GPUs)
    weights: dict[str, float] = field(
        default_factory=lambda: {"clip": 1.0, "itm": 0.0, "ref": 0.0, "bad": 1.0, "repeat": 1.0, "length": 0.0}
    )  # weight of each reward component in the total reward (0 turns a term off)
    bad_phrases: Optional[list[str]] = None  # phrases penalised by the 'bad' term; null: the built-in defaults
    repeat_ngram: int = 2  # n of the repeated n-grams the 'repeat' term penalises
    repeat_words: Literal["all", "adjacent", "none"] = "all"  # repeated content words the 'repeat' term counts: any repeat, only "red red", or none (n-grams only)
    kl_coef: float = 0.0  # KL-to-reference penalty coefficient, an alternative to the 'ref' term; 0 disables
    max_restarts: int = 3  # times Ray restarts a dead reward actor (-1: forever)
    max_task_retries: int = 3  # times Ray retries a scoring call on a restarted actor (-1: forever)
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources per actor, e.g. {reward: 1}
    batch_wait_s: float = 0.05  # how long a reward actor waits to merge requests from several rollout actors
    nice: int = 0  # os.nice() increment of the reward actors' scoring thread (0-19): where roles share CPU cores, >0 lets the learner go first
    cpu_affinity: list[int] = field(default_factory=list)  # CPU core ids each reward actor is pinned to on its node; empty: no pinning


@dataclass
class LearnerConfig:
    lr: float = 1e-4  # learning rate of the policy parameters
    value_lr: Optional[float] = None  # learning rate of the value head; null: same as lr
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip, of the policy's and of the value head's parameters each on its own; 0 disables
    gamma: float = 1.0  # discount of the per-token returns
    value_coef: float = 0.5  # weight of the value (MSE) loss
    entropy_coef: float = 0.0  # weight of the entropy bonus
    normalize_advantages: bool = False  # normalise advantages to zero mean, unit variance per batch
    baseline: Literal["value", "rloo"] = "value"  # advantage baseline: learned value head, or k-sample leave-one-out mean
    off_policy: Literal["none", "truncated_is", "vtrace"] = "truncated_is"  # correction for rollouts from older weights
    is_clip: float = 1.0  # clip of the importance weights (truncated IS / V-trace rho-bar and c-bar)
    max_policy_lag: int = 4  # rollouts more than this many policy versions old are dropped (and counted)
    queue_size: int = 8  # capacity of the rollout queue between actors and learner
    prefetch: bool = True  # async mode: queue the learner's next update behind the running one (no idle round trip per step)
    niceness: Optional[int] = None  # niceness of the learner's process, 0-19; null: Ray's default for workers (15). Lower runs the learner first where roles share CPU cores
    num_gpus: float = 0.0  # GPUs reserved for the learner
    num_cpus: float = 1.0  # CPUs reserved for the learner
    cpu_affinity: list[int] = field(default_factory=list)  # CPU core ids the learner is pinned to on its node (where roles share a node: a core of its own); empty: no pinning
    checkpoint_every: int = 50  # save a checkpoint every this many steps; 0 disables (a final one is still saved)
    log_every: int = 1  # print and log metrics every this many steps
    data_parallel_workers: int = 1  # learner ranks in data parallel: each updates on its share of every batch, gradients summed (torch.distributed)
    micro_batch_size: int = 0  # captions per learner forward/backward (gradients accumulated, same update); 0: the whole batch at once
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources for the learner, e.g. {learner: 1}


@dataclass
class EvalConfig:
    evaluator_path: str = "models/shapes/eval_clip"  # CLIP used for CLIP Recall (never a reward model)
    split: str = "test"  # split evaluated before and after training
    gallery_size: Optional[int] = None  # images in the retrieval gallery; null: the whole split
    val_every: int = 25  # run validation every this many steps; 0 disables
    val_subset: int = 200  # images of the validation split used for periodic validation
    decoding: Literal["greedy", "beam"] = "greedy"  # caption decoding for evaluation
    num_beams: int = 5  # beams when decoding is 'beam'
    no_repeat_ngram_size: int = 0  # forbid repeating n-grams of this size in evaluation decoding; 0 disables
    max_new_tokens: int = 40  # maximum caption length in tokens for evaluation


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # Ray cluster address ('auto', 'ray://host:10001'); null: start a local cluster
    dashboard_host: str = "127.0.0.1"  # interface the Ray dashboard binds to (0.0.0.0 to expose it)
    include_dashboard: bool = True  # start the Ray dashboard with a local cluster
    num_cpus: Optional[int] = None  # CPUs of a local cluster; null: all of the machine's
    namespace: str = "vlrm"  # Ray namespace of the run's named actors


@dataclass
class RunConfig:
    seed: int = 0  # global random seed (torch, numpy, python) of the run
    mode: Literal["local", "sync", "async"] = "async"  # local: one process; sync: Ray, generate then learn; async: Ray, overlapped
    output_dir: str = "runs"  # folder under which each run gets its own folder
    run_name: Optional[str] = None  # name of this run's folder; null: a timestamp
    total_steps: int = 200  # learner updates to run
    time_budget_s: Optional[float] = None  # stop after this many seconds of training; null: no limit
    data: DataConfig = field(default_factory=DataConfig)  # dataset
    policy: PolicyConfig = field(default_factory=PolicyConfig)  # captioner being trained
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # rollout (generation) actors
    reward: RewardConfig = field(default_factory=RewardConfig)  # reward-model actors and reward terms
    learner: LearnerConfig = field(default_factory=LearnerConfig)  # A2C learner
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation
    cluster: ClusterConfig = field(default_factory=ClusterConfig)  # Ray cluster


# --------------------------------------------------------------------------------------
# Errors and sources
# --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and where it came from."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


class _Source:
    """Where values come from, for error messages: a file (with line numbers) or an argument."""

    def __init__(self, label: str, lines: Mapping[tuple[str, ...], int] | None = None):
        self.label = label
        self.lines = lines or {}

    def where(self, path: Sequence[str]) -> str:
        line = self.lines.get(tuple(path))
        return f"{self.label}, line {line}" if line else self.label


class _Raw(str):
    """A command-line value: still text, parsed according to the field's type."""


class _Flag:
    """A bare ``--key`` on the command line (no value): true for bool fields."""

    def __repr__(self) -> str:
        return "<no value>"


_FLAG = _Flag()
_MISSING = object()


# --------------------------------------------------------------------------------------
# Type handling
# --------------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _optional_inner(tp: Any) -> Any:
    """``X`` for ``Optional[X]``, else ``_MISSING``."""
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0]
    return _MISSING


def _type_name(tp: Any) -> str:
    inner = _optional_inner(tp)
    if inner is not _MISSING:
        return f"{_type_name(inner)} or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[" + ", ".join(_type_name(a) for a in typing.get_args(tp)) + "]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    if isinstance(value, _Raw):
        return repr(str(value))
    if value is _FLAG:
        return "no value"
    return f"{value!r} ({type(value).__name__})"


def _bad(path: Sequence[str], src: _Source, tp: Any, value: Any, note: str = "") -> ConfigError:
    key = ".".join(path)
    msg = f"invalid value for '{key}' in {src.where(path)}: expected {_type_name(tp)}, got {_show(value)}"
    if note:
        msg += f" ({note})"
    return ConfigError(msg, key=key, source=src.label)


_NULL_TEXT = {"null", "~", "none", ""}
_TRUE_TEXT = {"true", "yes", "on", "1"}
_FALSE_TEXT = {"false", "no", "off", "0"}


def _parse_text(text: str) -> Any:
    """A command-line value as YAML (scalars and flow collections); unparsable text stays text."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(tp: Any, value: Any, path: tuple[str, ...], src: _Source, current: Any = _MISSING) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise a ConfigError naming ``path``.

    ``current`` is the field's present value, used to merge mappings into dataclasses and dicts.
    """
    inner = _optional_inner(tp)
    if inner is not _MISSING:  # Optional[X]
        if value is None:
            return None
        if isinstance(value, _Raw) and value.strip().lower() in _NULL_TEXT:
            return None
        return _coerce(inner, value, path, src, current if current is not None else _MISSING)

    if value is _FLAG and tp is not bool:
        raise ConfigError(
            f"'--{'.'.join(path)}' needs a value ({_type_name(tp)}), e.g. --{'.'.join(path)}=VALUE",
            key=".".join(path),
            source=src.label,
        )

    if dataclasses.is_dataclass(tp):
        if isinstance(value, _Raw):
            value = _parse_text(value)
        if value is None:  # an empty section ("rollout:" with every key commented out)
            value = {}
        if not isinstance(value, Mapping):
            raise _bad(path, src, tp, value)
        base = current if current is not _MISSING and current is not None else tp()
        return _apply_mapping(base, value, path, src)

    origin = typing.get_origin(tp)

    if origin is Literal:
        allowed = typing.get_args(tp)
        cand = str(value) if isinstance(value, _Raw) else value
        if isinstance(cand, str) and cand in allowed:
            return cand
        key = ".".join(path)
        raise ConfigError(
            f"invalid value for '{key}' in {src.where(path)}: got {cand!r}; allowed values: "
            + ", ".join(repr(a) for a in allowed),
            key=key,
            source=src.label,
        )

    if tp is bool:
        if value is _FLAG:
            return True
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE_TEXT:
                return True
            if low in _FALSE_TEXT:
                return False
        raise _bad(path, src, tp, value)

    if tp is int:
        if isinstance(value, bool):
            raise _bad(path, src, tp, value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:  # "1e3", "2.0"
                    f = float(value)
                except ValueError:
                    f = math.nan
                if f.is_integer():
                    return int(f)
        raise _bad(path, src, tp, value)

    if tp is float:
        if isinstance(value, bool):
            raise _bad(path, src, tp, value)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # also YAML's "1e-4", which PyYAML reads as text
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise _bad(path, src, tp, value)

    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _bad(path, src, tp, value, "quote it in YAML if it is meant as text")

    if origin is list:
        (elem,) = typing.get_args(tp) or (Any,)
        if isinstance(value, _Raw):
            text = str(value).strip()
            parsed = _parse_text(text)
            if isinstance(parsed, list):
                value = parsed
            elif text == "":
                value = []
            elif not text.startswith("["):  # convenience: --policy.lora_target_modules=q_proj,v_proj
                value = [_Raw(p.strip()) for p in text.split(",")]
            else:
                raise _bad(path, src, tp, value)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _bad(path, src, tp, value)
        return [_coerce(elem, v, path[:-1] + (f"{path[-1]}[{i}]",), src) for i, v in enumerate(value)]

    if origin is dict:
        ktp, vtp = typing.get_args(tp) or (str, Any)
        if isinstance(value, _Raw):
            value = _parse_text(value)
        if not isinstance(value, Mapping):
            raise _bad(path, src, tp, value)
        out = dict(current) if isinstance(current, Mapping) else {}
        for k, v in value.items():
            if ktp is str and not isinstance(k, str):
                raise ConfigError(
                    f"invalid key {k!r} under '{'.'.join(path)}' in {src.where(path)}: keys must be text",
                    key=".".join(path),
                    source=src.label,
                )
            out[k] = _coerce(vtp, v, path + (str(k),), src, out.get(k, _MISSING))
        return out

    if tp is Any:
        return _parse_text(value) if isinstance(value, _Raw) else value

    raise TypeError(f"config field '{'.'.join(path)}' has an unsupported type {tp!r}")


# --------------------------------------------------------------------------------------
# Applying mappings
# --------------------------------------------------------------------------------------


def _all_keys(cls: type = None, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every dotted key of the tree, sections included."""
    cls = cls or RunConfig
    out = []
    for f in dataclasses.fields(cls):
        p = prefix + (f.name,)
        out.append(".".join(p))
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_all_keys(tp, p))
    return out


def _suggest(cls: type, path: tuple[str, ...]) -> list[str]:
    """Closest valid dotted keys for an unknown key at ``path``."""
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = path[:-1]
    near = difflib.get_close_matches(path[-1], names, n=3, cutoff=0.6)
    if near:
        return [".".join(prefix + (n,)) for n in near]
    # Maybe the right key in the wrong section ("num_actors" at the top level).
    full = _all_keys()
    leaf = {}
    for k in full:
        leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    hits = []
    for n in difflib.get_close_matches(path[-1], list(leaf), n=3, cutoff=0.75):
        hits.extend(leaf[n])
    if hits:
        return hits[:4]
    return difflib.get_close_matches(".".join(path), full, n=3, cutoff=0.6)


def _unknown(cls: type, path: tuple[str, ...], src: _Source) -> ConfigError:
    key = ".".join(path)
    section = ".".join(path[:-1])
    msg = f"unknown config key '{key}' in {src.where(path)}"
    sugg = _suggest(cls, path)
    if sugg:
        msg += "; did you mean " + " or ".join(f"'{s}'" for s in sugg) + "?"
    else:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        msg += f"; valid keys{' under ' + repr(section) if section else ''}: {valid}"
    return ConfigError(msg, key=key, source=src.label)


def _apply_mapping(obj: Any, data: Mapping, path: tuple[str, ...], src: _Source) -> Any:
    """Set the fields of dataclass instance ``obj`` from ``data`` (in place) and return it."""
    cls = type(obj)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        kp = path + (str(k),)
        if not isinstance(k, str) or k not in names:
            raise _unknown(cls, kp, src)
        setattr(obj, k, _coerce(hints[k], v, kp, src, getattr(obj, k)))
    return obj


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line number (1-based) of every mapping key in a YAML document, by dotted path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                p = prefix + (str(knode.value),)
                lines[p] = knode.start_mark.line + 1
                walk(vnode, p)

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    except yaml.YAMLError:
        pass
    return lines


def _read_yaml(path: str | Path) -> tuple[dict, _Source]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}", source=str(path))
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"could not parse YAML config {str(path)!r}: {e}", source=str(path)) from e
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys at the top level, got {type(data).__name__}",
            source=str(path),
        )
    return dict(data), _Source(f"config file {str(path)!r}", _yaml_lines(text))


def _parse_override(item: str) -> tuple[tuple[str, ...], Any, str]:
    """``'--a.b=v'`` / ``'a.b=v'`` / ``'--a.b'`` -> (path, raw value, shown text)."""
    text = item[2:] if item.startswith("--") else item
    if "=" in text:
        key, val = text.split("=", 1)
        value: Any = _Raw(val)
    else:
        key, value = text, _FLAG
    key = key.strip()
    parts = tuple(key.split("."))
    if not key or any(not p for p in parts):
        raise ConfigError(f"malformed override {item!r}: expected --section.key=value", source="command line")
    return parts, value, item if item.startswith("--") else "--" + item


def _apply_override(cfg: RunConfig, item: str) -> None:
    parts, value, shown = _parse_override(item)
    src = _Source(f"command-line override {shown!r}")
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    _apply_mapping(cfg, nested, (), src)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def from_dict(d: Mapping[str, Any] | None, source: str = "config dict") -> RunConfig:
    """Build a RunConfig from a (possibly partial) nested mapping, strictly validated."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source} must be a mapping, got {type(d).__name__}", source=source)
    return _apply_mapping(RunConfig(), d, (), _Source(source))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain nested dicts/lists/scalars (YAML, JSON and msgpack safe)."""
    return dataclasses.asdict(cfg)


def to_flat_dict(cfg: Any) -> dict[str, Any]:
    """``{'rollout.num_actors': 2, ...}``: one entry per leaf field (dicts stay values)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            k = prefix + f.name
            if dataclasses.is_dataclass(v):
                walk(v, k + ".")
            else:
                out[k] = v

    walk(cfg, "")
    return out


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field and range checks; raises ConfigError naming the offending key."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"invalid value for '{key}': {why}", key=key)

    r, w, l, e, c = cfg.rollout, cfg.reward, cfg.learner, cfg.eval, cfg.cluster
    need(cfg.total_steps >= 0, "total_steps", f"must be >= 0, got {cfg.total_steps}")
    need(cfg.time_budget_s is None or cfg.time_budget_s > 0, "time_budget_s", f"must be > 0 or null, got {cfg.time_budget_s}")
    need(cfg.data.image_size > 0, "data.image_size", f"must be > 0, got {cfg.data.image_size}")
    need(cfg.policy.lora_r >= 0, "policy.lora_r", f"must be >= 0 (0 disables LoRA), got {cfg.policy.lora_r}")
    need(0.0 <= cfg.policy.lora_dropout < 1.0, "policy.lora_dropout", f"must be in [0, 1), got {cfg.policy.lora_dropout}")
    need(cfg.policy.value_head_hidden > 0, "policy.value_head_hidden", f"must be > 0, got {cfg.policy.value_head_hidden}")
    for sec, a in (("rollout", r), ("reward", w), ("learner", l)):
        need(all(isinstance(i, int) and i >= 0 for i in a.cpu_affinity), f"{sec}.cpu_affinity",
             f"must be a list of core ids >= 0 (empty: no pinning), got {a.cpu_affinity}")
    for sec, a in (("rollout", r), ("reward", w)):
        need(a.num_actors >= 1, f"{sec}.num_actors", f"must be >= 1, got {a.num_actors}")
        need(a.num_cpus >= 0, f"{sec}.num_cpus", f"must be >= 0, got {a.num_cpus}")
        need(a.num_gpus >= 0, f"{sec}.num_gpus", f"must be >= 0, got {a.num_gpus}")
        need(a.max_restarts >= -1, f"{sec}.max_restarts", f"must be >= -1 (-1: forever), got {a.max_restarts}")
        need(a.max_task_retries >= -1, f"{sec}.max_task_retries", f"must be >= -1 (-1: forever), got {a.max_task_retries}")
    need(r.images_per_batch >= 1, "rollout.images_per_batch", f"must be >= 1, got {r.images_per_batch}")
    need(r.samples_per_image >= 1, "rollout.samples_per_image", f"must be >= 1, got {r.samples_per_image}")
    need(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"must be >= 1, got {r.max_new_tokens}")
    need(
        0 <= r.min_new_tokens <= r.max_new_tokens,
        "rollout.min_new_tokens",
        f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}], got {r.min_new_tokens}",
    )
    need(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    need(0 <= r.nice <= 19, "rollout.nice", f"must be in [0, 19] (an os.nice increment), got {r.nice}")
    need(0 <= w.nice <= 19, "reward.nice", f"must be in [0, 19] (an os.nice increment), got {w.nice}")
    need(r.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 disables), got {r.top_k}")
    need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    need(w.repeat_ngram >= 1, "reward.repeat_ngram", f"must be >= 1, got {w.repeat_ngram}")
    need(w.kl_coef >= 0, "reward.kl_coef", f"must be >= 0, got {w.kl_coef}")
    need(w.batch_wait_s >= 0, "reward.batch_wait_s", f"must be >= 0, got {w.batch_wait_s}")
    for k, v in w.weights.items():
        need(math.isfinite(v), f"reward.weights.{k}", f"must be a finite number, got {v}")
    need(l.lr > 0, "learner.lr", f"must be > 0, got {l.lr}")
    need(l.value_lr is None or l.value_lr > 0, "learner.value_lr", f"must be > 0 or null, got {l.value_lr}")
    need(l.weight_decay >= 0, "learner.weight_decay", f"must be >= 0, got {l.weight_decay}")
    need(l.grad_clip >= 0, "learner.grad_clip", f"must be >= 0 (0 disables), got {l.grad_clip}")
    need(0.0 <= l.gamma <= 1.0, "learner.gamma", f"must be in [0, 1], got {l.gamma}")
    need(l.value_coef >= 0, "learner.value_coef", f"must be >= 0, got {l.value_coef}")
    need(l.is_clip > 0, "learner.is_clip", f"must be > 0, got {l.is_clip}")
    need(l.max_policy_lag >= 0, "learner.max_policy_lag", f"must be >= 0, got {l.max_policy_lag}")
    need(l.queue_size >= 1, "learner.queue_size", f"must be >= 1, got {l.queue_size}")
    need(l.num_cpus >= 0 and l.num_gpus >= 0, "learner.num_gpus", "learner num_cpus/num_gpus must be >= 0")
    need(l.checkpoint_every >= 0, "learner.checkpoint_every", f"must be >= 0 (0 disables), got {l.checkpoint_every}")
    need(l.log_every >= 1, "learner.log_every", f"must be >= 1, got {l.log_every}")
    need(l.data_parallel_workers >= 1, "learner.data_parallel_workers", f"must be >= 1, got {l.data_parallel_workers}")
    need(l.data_parallel_workers == 1 or cfg.mode != "local", "learner.data_parallel_workers",
         f"{l.data_parallel_workers} ranks need the Ray system (mode async or sync); the local loop has one learner")
    need(l.micro_batch_size >= 0, "learner.micro_batch_size", f"must be >= 0, got {l.micro_batch_size}")
    need(l.niceness is None or 0 <= l.niceness <= 19, "learner.niceness", f"must be null or in [0, 19], got {l.niceness}")
    need(not (l.micro_batch_size and l.normalize_advantages), "learner.micro_batch_size",
         "cannot be combined with learner.normalize_advantages (whitening needs the whole batch's advantages "
         "at once); set one of them to 0/false")
    need(not (l.data_parallel_workers > 1 and l.normalize_advantages), "learner.data_parallel_workers",
         "cannot be combined with learner.normalize_advantages (each rank would whiten only its share of the "
         "batch); set one of them to 1/false")
    need(
        l.baseline != "rloo" or r.samples_per_image >= 2,
        "learner.baseline",
        f"'rloo' needs rollout.samples_per_image >= 2, got {r.samples_per_image}",
    )
    need(e.gallery_size is None or e.gallery_size >= 1, "eval.gallery_size", f"must be >= 1 or null, got {e.gallery_size}")
    need(e.val_every >= 0, "eval.val_every", f"must be >= 0 (0 disables), got {e.val_every}")
    need(e.val_subset >= 1, "eval.val_subset", f"must be >= 1, got {e.val_subset}")
    need(e.num_beams >= 1, "eval.num_beams", f"must be >= 1, got {e.num_beams}")
    need(e.no_repeat_ngram_size >= 0, "eval.no_repeat_ngram_size", f"must be >= 0, got {e.no_repeat_ngram_size}")
    need(e.max_new_tokens >= 1, "eval.max_new_tokens", f"must be >= 1, got {e.max_new_tokens}")
    need(c.num_cpus is None or c.num_cpus >= 1, "cluster.num_cpus", f"must be >= 1 or null, got {c.num_cpus}")
    return cfg


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), *, check: bool = True
) -> RunConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides`` (``'rollout.num_actors=3'``).

    Overrides may carry a leading ``--``; a bare ``'key'`` sets a bool field to true.
    With ``check`` (default), range and cross-field checks run too (:func:`validate`).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    cfg = RunConfig()
    if path is not None:
        data, src = _read_yaml(path)
        _apply_mapping(cfg, data, (), src)
    for item in overrides:
        _apply_override(cfg, item)
    return validate(cfg) if check else cfg


def split_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split argv into (``--config`` path, overrides as ``'key=value'`` / ``'key'`` strings).

    Accepted: ``--config f.yaml``, ``--config=f.yaml``, ``--a.b=v``, ``--a.b v``, ``a.b=v``,
    and a bare ``--a.b`` (followed by another ``--`` option or the end) for bool fields.
    """
    argv = list(argv)
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            if a == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("--config needs a file path: --config configs/shapes.yaml", source="command line")
                val = argv[i + 1]
                i += 1
            else:
                val = a.split("=", 1)[1]
            if config is not None:
                raise ConfigError(f"--config given twice ({config!r} and {val!r})", source="command line")
            config = val
        elif a.startswith("--") and len(a) > 2:
            body = a[2:]
            if "=" in body:
                overrides.append(body)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(body)
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            raise ConfigError(
                f"unexpected command-line argument {a!r}: use --config FILE and overrides like --rollout.num_actors=3",
                source="command line",
            )
        i += 1
    return config, overrides


def parse_cli(argv: Sequence[str] | None = None, *, check: bool = True) -> RunConfig:
    """A RunConfig from command-line arguments (``sys.argv[1:]`` by default); see :func:`split_cli`.

    ``-h`` / ``--help`` prints every key with its type, default and description, then exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        raise SystemExit(0)
    path, overrides = split_cli(argv)
    return load_config(path, overrides, check=check)


def resolve(cfg: RunConfig, now: float | None = None) -> RunConfig:
    """A copy with run-time defaults filled in: ``run_name`` (timestamp) and ``learner.value_lr`` (lr)."""
    out = from_dict(to_dict(cfg))
    if out.run_name is None:
        out.run_name = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    if out.learner.value_lr is None:
        out.learner.value_lr = out.learner.lr
    return out


def run_dir(cfg: RunConfig) -> Path:
    """``output_dir/run_name`` of a resolved config."""
    if cfg.run_name is None:
        raise ConfigError("run_name is not set: call resolve(cfg) first", key="run_name")
    return Path(cfg.output_dir) / cfg.run_name


# --------------------------------------------------------------------------------------
# Field documentation, help text and YAML output
# --------------------------------------------------------------------------------------

_DOCS: dict[type, dict[str, str]] = {}


def field_docs(cls: type) -> dict[str, str]:
    """``{field name: its one-line comment}`` for a config dataclass, read from this source."""
    if cls in _DOCS:
        return _DOCS[cls]
    docs: dict[str, str] = {}
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        _DOCS[cls] = docs
        return docs
    names = {f.name for f in dataclasses.fields(cls)}
    current: str | None = None
    depth = 0
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.NAME and depth == 0 and tok.start[1] == 4 and tok.string in names:
            current = tok.string
        elif tok.type == tokenize.COMMENT and current and depth == 0:
            docs.setdefault(current, tok.string.lstrip("#").strip())
        elif tok.type == tokenize.NEWLINE:
            current = None
    _DOCS[cls] = docs
    return docs


def format_help() -> str:
    """Usage text listing every dotted key with its type, default and description."""
    lines = [
        "usage: launch.py [--config FILE.yaml] [--section.key=VALUE | --section.key VALUE ...]",
        "",
        "Values are YAML: numbers, true/false, null, [a, b], {k: v}. Later sources win:",
        "defaults < --config file < overrides.",
    ]

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = field_docs(cls)
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            v = getattr(obj, f.name)
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append("")
                lines.append(f"{prefix}{f.name}: {docs.get(f.name, '')}")
                walk(tp, v, prefix + f.name + ".")
            else:
                lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}, default {_yaml_inline(v)})")
                if docs.get(f.name):
                    lines.append(f"        {docs[f.name]}")

    walk(RunConfig, RunConfig(), "")
    return "\n".join(lines)


def _yaml_inline(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True, sort_keys=False)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.strip()


def dump_yaml(cfg: Any, comments: bool = True) -> str:
    """The config as YAML text: sections as blocks, one key per line, each with its comment."""
    out: list[str] = []

    def walk(obj: Any, indent: str) -> None:
        docs = field_docs(type(obj)) if comments else {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            doc = docs.get(f.name, "")
            if dataclasses.is_dataclass(v):
                out.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
                walk(v, indent + "  ")
            else:
                out.append(f"{indent}{f.name}: {_yaml_inline(v)}" + (f"  # {doc}" if doc else ""))

    walk(cfg, "")
    return "\n".join(out) + "\n"


def save_config(cfg: Any, path: str | Path, comments: bool = True) -> Path:
    """Write the config as YAML (``load_config(path)`` reads it back equal); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(dump_yaml(cfg, comments=comments), encoding="utf-8")
    return p
