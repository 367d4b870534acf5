"""The configuration tree: one typed dataclass tree, grouped by role, validated by pydantic.

The tree (``RunConfig`` -> ``data``, ``policy``, ``rollout``, ``reward``, ``learner``,
``eval``, ``cluster``) is the single source of truth for every setting. Each field is
``Annotated[type, "what it does"]``: the text is what ``--help`` prints.

Sources, applied in order: the defaults below; a YAML file (``--config file.yaml``) with any
subset of keys; command-line overrides with dotted keys (``--rollout.num_actors=3``,
``--rollout.num_actors 3``, ``rollout.num_actors=3``, a bare ``--flag`` for true). Values are
YAML scalars or flow collections, except ``str`` fields, which take the text as it is. Mappings
merge key by key (``--reward.components.itm.weight=1`` leaves the other components alone).

Reward settings are one block per component under ``reward.components``: the built-in ones
(``clip``, ``itm``, ``ref``, ``bad``, ``repeat``, ``length``) have typed options; any other name
is a user's reward, ``{target: "pkg.module:factory" or "path/file.py:factory", weight: w, ...its
own options}`` (see ``rewards.combine``).

Validation (types, ``Literal`` choices, unknown keys) is pydantic's; :mod:`vlrm.config` reads
the sources and turns its errors into :class:`ConfigError` naming the full dotted key, where the
value came from (file and line, or the argument) and the closest valid key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import ConfigDict, with_config

__all__ = [
    "ConfigError", "RunConfig", "DataConfig", "PolicyConfig", "RolloutConfig", "RewardConfig", "LearnerConfig",
    "EvalConfig", "ClusterConfig", "ClipComponent", "ItmComponent", "RefComponent", "BadComponent",
    "RepeatComponent", "LengthComponent", "BindingComponent", "GroundedLMComponent", "PluginComponent",
    "BUILTIN_COMPONENTS", "default_components",
    "VLLMConfig", "rollout_backends", "validate", "run_dir", "Dtype",
]

_STRICT = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
Dtype = Literal["float32", "bfloat16", "float16"]


def _section(cls):
    return with_config(_STRICT)(dataclass(cls))


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and where it came from."""

    def __init__(self, message: str, key: str | None = None, source: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source


@_section
class DataConfig:
    source: Annotated[str, "data source: 'shapes' (the generated world), 'parquet' (tables with an image column), "
                           "'folder' (image files), 'karpathy' (a COCO/Flickr split file), or 'pkg.module:Class'"] = "shapes"
    root: Annotated[str, "where the source's splits are: a folder (split.parquet or split/), or the Karpathy split "
                         "file"] = "data/shapes"
    image_root: Annotated[Optional[str], "karpathy source: the images folder; null: images/ beside the split file, "
                                         "or its folder"] = None
    train_split: Annotated[str, "split the rollout actors draw training images from"] = "train"
    val_split: Annotated[str, "split used for periodic validation during training"] = "val"
    test_split: Annotated[str, "split used for the final before/after evaluation"] = "test"
    cache_mb: Annotated[float, "encoded image bytes each process keeps in memory per split (Parquet row groups); "
                               "bounds memory whatever the split's size"] = 256.0
    image_size: Annotated[int, "shapes source: side of the square images, in pixels"] = 64
    seed: Annotated[int, "shapes source: seed of the world generator"] = 0
    small_radius: Annotated[float, "shapes source: a small object's radius as a share of its grid cell's side "
                                   "(large: 0.42)"] = 0.2
    num_train: Annotated[int, "shapes source: training scenes the generator writes"] = 20000
    num_val: Annotated[int, "shapes source: validation scenes the generator writes"] = 1000
    num_test: Annotated[int, "shapes source: test scenes the generator writes"] = 1000


@_section
class PolicyConfig:
    model_path: Annotated[str, "BLIP-2 captioner: local directory or Hugging Face hub id"] = "models/shapes/captioner"
    dtype: Annotated[Dtype, "parameter/compute dtype of the policy"] = "float32"
    init_from: Annotated[Optional[str], "a released-style delta (.pt read weights-only, or .safetensors: qformer.*, "
                                        "query_tokens, language_projection.*) loaded onto model_path"] = None
    train_qformer: Annotated[bool, "train the Q-Former"] = True
    train_query_tokens: Annotated[bool, "train the learned query tokens"] = True
    train_projection: Annotated[bool, "train the Q-Former -> LM language projection"] = True
    train_vision: Annotated[bool, "train the vision tower (frozen in the paper)"] = False
    lora_r: Annotated[int, "LoRA rank on the language model; 0 disables LoRA (LM base stays frozen)"] = 8
    lora_alpha: Annotated[int, "LoRA scaling numerator (scale = lora_alpha / lora_r)"] = 16
    lora_dropout: Annotated[float, "dropout on the LoRA branch"] = 0.0
    lora_target_modules: Annotated[list[str], "LM module names that get LoRA adapters"] = field(
        default_factory=lambda: ["q_proj", "v_proj"])
    value_head_hidden: Annotated[int, "hidden width of the value-head MLP"] = 128
    value_head_use_query: Annotated[bool, "also feed the pooled query embeddings to the value head"] = False
    value_head_detach: Annotated[bool, "true: the value loss trains only the value head, not Q-Former/LoRA (sharing "
                                       "them slowed learning several-fold on the shapes world)"] = True
    disable_dropout: Annotated[bool, "keep the BLIP-2 modules in eval mode so sampled and learner log-probs "
                                     "agree"] = True


@_section
class VLLMConfig:
    python: Annotated[str, "Python executable of the vLLM environment the vllm rollout actors run in (Ray "
                           "runtime_env py_executable; built by 'make vllm-env'); empty: this one"] = ".venv-vllm/bin/python"
    gpu_memory_utilization: Annotated[float, "share of the GPU's memory vLLM may take (weights + KV cache)"] = 0.5
    cpu_kv_cache_gib: Annotated[int, "KV-cache size on a CPU engine, GiB (VLLM_CPU_KVCACHE_SPACE)"] = 1
    max_num_seqs: Annotated[int, "most sequences vLLM runs in one step (images_per_batch * "
                                 "samples_per_image fits in one)"] = 256
    enforce_eager: Annotated[bool, "no CUDA graphs / torch.compile (faster start, slower decoding)"] = True
    max_model_len: Annotated[int, "prompt (query tokens + BOS) plus caption tokens; 0: the model's own "
                                  "limit"] = 0


@_section
class RolloutConfig:
    num_actors: Annotated[int, "number of rollout (generation) actors"] = 2
    num_cpus: Annotated[float, "CPUs reserved per rollout actor"] = 1.0
    num_gpus: Annotated[float, "GPUs reserved per rollout actor (fractions share a GPU)"] = 0.0
    nice: Annotated[int, "os.nice() increment of rollout actor processes (0-19): where roles share CPU cores, "
                         ">0 lets the learner go first"] = 0
    cpu_affinity: Annotated[list[int], "CPU core ids each rollout actor is pinned to on its node; empty: no "
                                       "pinning"] = field(default_factory=list)
    backend: Annotated[str, "generation backend: a registered name ('hf': transformers generate, 'vllm': a "
                            "vLLM engine with in-place weight updates) or 'pkg.module:Class'"] = "hf"
    backend_per_actor: Annotated[list[str], "one backend per rollout actor (length rollout.num_actors), e.g. "
                                            "[vllm, hf]; empty: every actor uses rollout.backend"] = field(default_factory=list)
    vllm: Annotated[VLLMConfig, "the vllm backend's engine"] = field(default_factory=VLLMConfig)
    images_per_batch: Annotated[int, "images per rollout batch"] = 16
    samples_per_image: Annotated[int, "captions sampled per image (k); image features are computed once per "
                                      "image"] = 4
    max_new_tokens: Annotated[int, "maximum caption length in tokens when sampling"] = 40
    min_new_tokens: Annotated[int, "minimum caption length in tokens when sampling"] = 1
    temperature: Annotated[float, "sampling temperature"] = 1.0
    top_k: Annotated[int, "top-k sampling; 0 disables"] = 0
    top_p: Annotated[float, "nucleus sampling threshold; 1.0 disables"] = 1.0
    max_restarts: Annotated[int, "times Ray restarts a dead rollout actor (-1: forever)"] = 3
    max_task_retries: Annotated[int, "times Ray retries a rollout call on a restarted actor (-1: forever)"] = 3
    resources: Annotated[dict[str, float], "Ray custom resources per actor, e.g. {rollout: 1} (cluster.yaml node "
                                           "types)"] = field(default_factory=dict)


# ---------------------------------------------------------------- reward components


@_section
class ClipComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 1.0
    path: Annotated[str, "CLIP reward model: local open_clip directory, or '<arch>/<pretrained>' "
                         "(ViT-L-14/openai)"] = "models/shapes/reward_clip"
    prompt_prefix: Annotated[str, "text prepended to each caption before CLIP scores it"] = ""
    contrast: Annotated[Literal["none", "batch"], "'batch': the log-prob of retrieving the own image among the "
                                                  "batch's images"] = "none"


@_section
class ItmComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    path: Annotated[str, "BLIP2-ITM reward model (Blip2ForImageTextRetrieval): local directory or hub "
                         "id"] = "models/shapes/reward_itm"


@_section
class RefComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    lm_path: Annotated[Optional[str], "reference causal LM; null: the frozen base captioner's LM"] = None


@_section
class BadComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 1.0
    phrases: Annotated[Optional[list[str]], "phrases penalised; null: the built-in defaults"] = None


@_section
class RepeatComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 1.0
    ngram: Annotated[int, "n of the repeated n-grams penalised"] = 2
    words: Annotated[Literal["all", "adjacent", "none"], "repeated content words counted: any repeat, only "
                                                         "'red red', or none (n-grams only)"] = "all"


@_section
class LengthComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0


@_section
class BindingComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    path: Annotated[str, "CLIP that compares the caption with its attribute swaps (rewards/binding.py)"] = \
        "models/shapes/reward_clip"
    max_swaps: Annotated[int, "attribute swaps per caption"] = 4
    groups: Annotated[Optional[dict[str, list[str]]], "word groups whose members trade places (colours, sizes, "
                                                      "shapes, positions); null: the built-in groups"] = None


@_section
class PhraseItmComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    path: Annotated[str, "BLIP2-ITM model that scores each phrase alone (rewards/phrase_itm.py)"] = \
        "models/shapes/reward_itm"
    reduce: Annotated[Literal["min", "mean"], "what counts of the phrases' ITM logits: the weakest, or their "
                                              "mean"] = "min"
    separators: Annotated[Optional[list[str]], "where captions split into phrases (punctuation, or whole "
                                               "words); null: ',', ';', 'and', 'with'"] = None


@_section
class GroundedLMComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    path: Annotated[Optional[str], "captioner whose likelihood ratio scores the caption (rewards/grounded_lm.py); "
                                   "null: the policy's base captioner"] = None
    negatives: Annotated[int, "other images of the batch each caption is contrasted with"] = 4
    alpha: Annotated[float, "weight of the negatives' mean log-likelihood (0: the plain log-likelihood)"] = 1.0
    per_token: Annotated[bool, "the score per token instead of summed over the caption"] = False
    max_token_gain: Annotated[Optional[float], "cap on each token's contrast before the sum (null: none; 0: only "
                                               "tokens likelier with the other images count, a penalty)"] = None


@_section
class ClaimsComponent:
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 0.0
    path: Annotated[str, "the verifier (rewards/claims.py): a cell reader folder (reader.json) or a BLIP2-ITM "
                         "model"] = "models/shapes/reader"
    false_cost: Annotated[float, "what an expected false claim costs, against 1 for an expected true one"] = 1.0
    unbound: Annotated[bool, "with a cell reader: modifiers no noun takes ('a large blue at the top') are claims "
                             "about some object; false: they claim nothing, as the caption parser's default"] = True


@_section
class PluginComponent:
    target: Annotated[str, "the factory: 'pkg.module:factory' or 'path/to/file.py:factory'"]
    weight: Annotated[float, "weight in the total reward (0: never computed)"] = 1.0
    options: Annotated[dict[str, Any], "keyword arguments of the factory (given inline beside target and "
                                       "weight, or here)"] = field(default_factory=dict)


BUILTIN_COMPONENTS: dict[str, type] = {"clip": ClipComponent, "itm": ItmComponent, "ref": RefComponent,
                                       "bad": BadComponent, "repeat": RepeatComponent, "length": LengthComponent,
                                       "binding": BindingComponent, "phrase_itm": PhraseItmComponent,
                                       "grounded_lm": GroundedLMComponent, "claims": ClaimsComponent}


def default_components() -> dict[str, Any]:
    return {name: cls() for name, cls in BUILTIN_COMPONENTS.items()}


@_section
class RewardConfig:
    num_actors: Annotated[int, "number of reward-model actors"] = 1
    num_cpus: Annotated[float, "CPUs reserved per reward actor"] = 1.0
    num_gpus: Annotated[float, "GPUs reserved per reward actor (fractions share a GPU)"] = 0.0
    components: Annotated[dict[str, Any], "one block per reward component: weight and its own options; a name that "
                                          "is not built in needs a target"] = field(default_factory=default_components)
    dtype: Annotated[Dtype, "parameter dtype of the CLIP, ITM and reference-LM reward models (bfloat16 on "
                            "GPUs)"] = "float32"
    kl_coef: Annotated[float, "KL-to-reference penalty coefficient, an alternative to the 'ref' component; 0 "
                              "disables"] = 0.0
    max_restarts: Annotated[int, "times Ray restarts a dead reward actor (-1: forever)"] = 3
    max_task_retries: Annotated[int, "times Ray retries a scoring call on a restarted actor (-1: forever)"] = 3
    resources: Annotated[dict[str, float], "Ray custom resources per actor, e.g. {reward: 1}"] = field(
        default_factory=dict)
    batch_wait_s: Annotated[float, "how long a reward actor waits to merge requests from several rollout "
                                   "actors"] = 0.05
    nice: Annotated[int, "os.nice() increment of the reward actors' scoring thread (0-19)"] = 0
    cpu_affinity: Annotated[list[int], "CPU core ids each reward actor is pinned to on its node; empty: no "
                                       "pinning"] = field(default_factory=list)

    def weights(self) -> dict[str, float]:
        """``{component name: weight}``."""
        return {name: float(c.weight) for name, c in self.components.items()}


@_section
class LearnerConfig:
    lr: Annotated[float, "learning rate of the policy parameters"] = 1e-4
    value_lr: Annotated[Optional[float], "learning rate of the value head; null: same as lr"] = None
    weight_decay: Annotated[float, "AdamW weight decay"] = 0.0
    grad_clip: Annotated[float, "gradient-norm clip, of the policy's and of the value head's parameters each on "
                                "its own; 0 disables"] = 1.0
    gamma: Annotated[float, "discount of the per-token returns"] = 1.0
    value_coef: Annotated[float, "weight of the value (MSE) loss"] = 0.5
    entropy_coef: Annotated[float, "weight of the entropy bonus"] = 0.0
    normalize_advantages: Annotated[bool, "normalise advantages to zero mean, unit variance per batch"] = False
    baseline: Annotated[Literal["value", "rloo"], "advantage baseline: learned value head, or k-sample "
                                                  "leave-one-out mean"] = "value"
    off_policy: Annotated[Literal["none", "truncated_is", "vtrace"], "correction for rollouts from older "
                                                                     "weights"] = "truncated_is"
    is_clip: Annotated[float, "clip of the importance weights (truncated IS / V-trace rho-bar and c-bar)"] = 1.0
    max_policy_lag: Annotated[int, "rollouts more than this many policy versions old are dropped (and "
                                   "counted)"] = 4
    queue_size: Annotated[int, "capacity of the rollout queue between actors and learner"] = 8
    prefetch: Annotated[bool, "async mode: queue the learner's next update behind the running one"] = True
    niceness: Annotated[Optional[int], "niceness of the learner's process, 0-19; null: Ray's default for workers "
                                       "(15)"] = None
    num_gpus: Annotated[float, "GPUs reserved for the learner"] = 0.0
    num_cpus: Annotated[float, "CPUs reserved for the learner"] = 1.0
    cpu_affinity: Annotated[list[int], "CPU core ids the learner is pinned to on its node; empty: no "
                                       "pinning"] = field(default_factory=list)
    checkpoint_every: Annotated[int, "save a checkpoint every this many steps; 0 disables (a final one is still "
                                     "saved)"] = 50
    keep_checkpoints: Annotated[int, "checkpoints kept in the run folder, the newest; 0 keeps every one"] = 3
    restarts_from_checkpoint: Annotated[int, "times a Ray run continues from its last checkpoint when the learner "
                                             "actor dies (new actors, the run's folder); 0: the run stops"] = 2
    log_every: Annotated[int, "write metrics every this many steps"] = 1
    print_every_s: Annotated[float, "seconds between progress lines on the console"] = 10.0
    data_parallel_workers: Annotated[int, "learner ranks in data parallel: each updates on its share of every "
                                          "batch, gradients summed (torch.distributed)"] = 1
    micro_batch_size: Annotated[int, "captions per learner forward/backward (gradients accumulated, same update); "
                                     "0: the whole batch at once"] = 0
    resources: Annotated[dict[str, float], "Ray custom resources for the learner, e.g. {learner: 1}"] = field(
        default_factory=dict)


@_section
class EvalConfig:
    evaluator_path: Annotated[str, "CLIP used for CLIP Recall (never a reward model)"] = "models/shapes/eval_clip"
    split: Annotated[str, "split evaluated before and after training"] = "test"
    gallery_size: Annotated[Optional[int], "images in the retrieval gallery; null: the whole split"] = None
    val_every: Annotated[int, "run validation every this many steps; 0 disables"] = 25
    val_subset: Annotated[int, "images of the validation split used for periodic validation"] = 200
    val_examples: Annotated[int, "captions of the first validation images kept at each validation (metrics.jsonl "
                                 "'val/examples', TensorBoard text, the first on the console); 0: none"] = 4
    decoding: Annotated[Literal["greedy", "beam"], "caption decoding for evaluation"] = "greedy"
    num_beams: Annotated[int, "beams when decoding is 'beam'"] = 5
    no_repeat_ngram_size: Annotated[int, "forbid repeating n-grams of this size in evaluation decoding; 0 "
                                         "disables"] = 0
    max_new_tokens: Annotated[int, "maximum caption length in tokens for evaluation"] = 40


@_section
class ClusterConfig:
    address: Annotated[Optional[str], "Ray cluster address ('auto', 'ray://host:10001'); null: start a local "
                                      "cluster"] = None
    dashboard_host: Annotated[str, "interface the Ray dashboard binds to (0.0.0.0 exposes it)"] = "127.0.0.1"
    include_dashboard: Annotated[bool, "start the Ray dashboard with a local cluster"] = True
    num_cpus: Annotated[Optional[int], "CPUs of a local cluster; null: all of the machine's"] = None
    namespace: Annotated[str, "Ray namespace of the run's named actors"] = "vlrm"
    malloc_mmap_threshold_kb: Annotated[int, "every actor serves allocations of at least this many KiB with their "
                                             "own mmap, returned on free (glibc M_MMAP_THRESHOLD; keeps long runs' "
                                             "memory flat, BENCHMARKS.md); 0: glibc's own, which rises"] = 1024
    trim_heap_every_s: Annotated[float, "every actor hands its free C heap pages back to the system (glibc "
                                        "malloc_trim) at most this often, between calls; 0: never"] = 60.0
    head_timeout_s: Annotated[float, "stop the driver with a resume message when the Ray head's GCS has not "
                                     "answered for this many seconds (Ray itself gives up after 60); 0: no watch"] = 20.0


@_section
class RunConfig:
    seed: Annotated[int, "global random seed (torch, numpy, python) of the run"] = 0
    mode: Annotated[Literal["local", "sync", "async"], "local: one process; sync: Ray, generate then learn; "
                                                       "async: Ray, overlapped"] = "async"
    output_dir: Annotated[str, "folder under which each run gets its own folder"] = "runs"
    run_name: Annotated[Optional[str], "name of this run's folder; null: a timestamp"] = None
    total_steps: Annotated[int, "learner updates to run"] = 200
    time_budget_s: Annotated[Optional[float], "stop after this many seconds of training; null: no limit"] = None
    data: Annotated[DataConfig, "dataset"] = field(default_factory=DataConfig)
    policy: Annotated[PolicyConfig, "captioner being trained"] = field(default_factory=PolicyConfig)
    rollout: Annotated[RolloutConfig, "rollout (generation) actors"] = field(default_factory=RolloutConfig)
    reward: Annotated[RewardConfig, "reward-model actors and reward components"] = field(default_factory=RewardConfig)
    learner: Annotated[LearnerConfig, "A2C learner"] = field(default_factory=LearnerConfig)
    eval: Annotated[EvalConfig, "evaluation"] = field(default_factory=EvalConfig)
    cluster: Annotated[ClusterConfig, "Ray cluster"] = field(default_factory=ClusterConfig)


# --------------------------------------------------------------------------------------
# Range and cross-field checks
# --------------------------------------------------------------------------------------


def rollout_backends(r: RolloutConfig) -> list[str]:
    """The backend of each rollout actor, in actor order."""
    return list(r.backend_per_actor) if r.backend_per_actor else [r.backend] * int(r.num_actors)


def validate(cfg: RunConfig) -> RunConfig:
    """Range and cross-field checks; raises ConfigError naming the offending key."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"invalid value for '{key}': {why}", key=key)

    def at_least(key: str, value: float, low: float, note: str = "") -> None:
        need(value >= low, key, f"must be >= {low}{note}, got {value}")

    from vlrm.backend import BACKENDS
    from vlrm.data import SOURCES
    from vlrm.registry import is_target

    r, w, l, e, c = cfg.rollout, cfg.reward, cfg.learner, cfg.eval, cfg.cluster
    need(cfg.data.source in SOURCES or is_target(cfg.data.source), "data.source",
         f"unknown data source {cfg.data.source!r}: built in are {', '.join(SOURCES)}, or give 'pkg.module:Class'")
    for key, name in [("rollout.backend", r.backend)] + [("rollout.backend_per_actor", b) for b in r.backend_per_actor]:
        need(name in BACKENDS or is_target(name), key,
             f"unknown generation backend {name!r}: built in are {', '.join(BACKENDS)}, or give 'pkg.module:Class'")
    need(not r.backend_per_actor or len(r.backend_per_actor) == r.num_actors, "rollout.backend_per_actor",
         f"needs one backend per rollout actor ({r.num_actors}), got {len(r.backend_per_actor)}")
    need(cfg.mode != "local" or "vllm" not in rollout_backends(r), "rollout.backend",
         "the vllm backend runs in rollout actors of its own, in the vLLM environment: use --mode async or "
         "--mode sync (and 'make vllm-env'), or rollout.backend=hf with --mode local")
    need(0.0 < r.vllm.gpu_memory_utilization <= 1.0, "rollout.vllm.gpu_memory_utilization",
         f"must be in (0, 1], got {r.vllm.gpu_memory_utilization}")
    at_least("rollout.vllm.cpu_kv_cache_gib", r.vllm.cpu_kv_cache_gib, 1)
    at_least("rollout.vllm.max_num_seqs", r.vllm.max_num_seqs, 1)
    at_least("rollout.vllm.max_model_len", r.vllm.max_model_len, 0)
    at_least("total_steps", cfg.total_steps, 0)
    need(cfg.time_budget_s is None or cfg.time_budget_s > 0, "time_budget_s", f"must be > 0 or null, got {cfg.time_budget_s}")
    at_least("data.image_size", cfg.data.image_size, 1)
    need(cfg.data.cache_mb > 0, "data.cache_mb", f"must be > 0, got {cfg.data.cache_mb}")
    at_least("policy.lora_r", cfg.policy.lora_r, 0, " (0 disables LoRA)")
    need(0.0 <= cfg.policy.lora_dropout < 1.0, "policy.lora_dropout", f"must be in [0, 1), got {cfg.policy.lora_dropout}")
    at_least("policy.value_head_hidden", cfg.policy.value_head_hidden, 1)
    for sec, a in (("rollout", r), ("reward", w), ("learner", l)):
        need(all(i >= 0 for i in a.cpu_affinity), f"{sec}.cpu_affinity",
             f"must be a list of core ids >= 0 (empty: no pinning), got {a.cpu_affinity}")
        at_least(f"{sec}.num_cpus", a.num_cpus, 0)
        at_least(f"{sec}.num_gpus", a.num_gpus, 0)
    for sec, a in (("rollout", r), ("reward", w)):
        at_least(f"{sec}.num_actors", a.num_actors, 1)
        at_least(f"{sec}.max_restarts", a.max_restarts, -1, " (-1: forever)")
        at_least(f"{sec}.max_task_retries", a.max_task_retries, -1, " (-1: forever)")
        need(0 <= a.nice <= 19, f"{sec}.nice", f"must be in [0, 19] (an os.nice increment), got {a.nice}")
    for key in ("images_per_batch", "samples_per_image", "max_new_tokens"):
        at_least(f"rollout.{key}", getattr(r, key), 1)
    need(0 <= r.min_new_tokens <= r.max_new_tokens, "rollout.min_new_tokens",
         f"must be in [0, rollout.max_new_tokens={r.max_new_tokens}], got {r.min_new_tokens}")
    need(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    at_least("rollout.top_k", r.top_k, 0, " (0 disables)")
    need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    for name, comp in w.components.items():
        need(math.isfinite(comp.weight), f"reward.components.{name}.weight", f"must be a finite number, got {comp.weight}")
    need(w.components["repeat"].ngram >= 1 if "repeat" in w.components else True, "reward.components.repeat.ngram",
         "must be >= 1")
    at_least("reward.kl_coef", w.kl_coef, 0)
    at_least("reward.batch_wait_s", w.batch_wait_s, 0)
    need(l.lr > 0, "learner.lr", f"must be > 0, got {l.lr}")
    need(l.value_lr is None or l.value_lr > 0, "learner.value_lr", f"must be > 0 or null, got {l.value_lr}")
    at_least("learner.weight_decay", l.weight_decay, 0)
    at_least("learner.grad_clip", l.grad_clip, 0, " (0 disables)")
    need(0.0 <= l.gamma <= 1.0, "learner.gamma", f"must be in [0, 1], got {l.gamma}")
    at_least("learner.value_coef", l.value_coef, 0)
    need(l.is_clip > 0, "learner.is_clip", f"must be > 0, got {l.is_clip}")
    at_least("learner.max_policy_lag", l.max_policy_lag, 0)
    at_least("learner.queue_size", l.queue_size, 1)
    at_least("learner.checkpoint_every", l.checkpoint_every, 0, " (0 disables)")
    at_least("learner.log_every", l.log_every, 1)
    at_least("learner.keep_checkpoints", l.keep_checkpoints, 0, " (0 keeps every one)")
    at_least("learner.restarts_from_checkpoint", l.restarts_from_checkpoint, 0, " (0: the run stops)")
    at_least("learner.print_every_s", l.print_every_s, 0)
    at_least("learner.data_parallel_workers", l.data_parallel_workers, 1)
    need(l.data_parallel_workers == 1 or cfg.mode != "local", "learner.data_parallel_workers",
         f"{l.data_parallel_workers} ranks need the Ray system (mode async or sync); the local loop has one learner")
    at_least("learner.micro_batch_size", l.micro_batch_size, 0)
    need(l.niceness is None or 0 <= l.niceness <= 19, "learner.niceness", f"must be null or in [0, 19], got {l.niceness}")
    need(not (l.micro_batch_size and l.normalize_advantages), "learner.micro_batch_size",
         "cannot be combined with learner.normalize_advantages (whitening needs the whole batch's advantages "
         "at once); set one of them to 0/false")
    need(not (l.data_parallel_workers > 1 and l.normalize_advantages), "learner.data_parallel_workers",
         "cannot be combined with learner.normalize_advantages (each rank would whiten only its share of the "
         "batch); set one of them to 1/false")
    need(l.baseline != "rloo" or r.samples_per_image >= 2, "learner.baseline",
         f"'rloo' needs rollout.samples_per_image >= 2, got {r.samples_per_image}")
    need(e.gallery_size is None or e.gallery_size >= 1, "eval.gallery_size", f"must be >= 1 or null, got {e.gallery_size}")
    at_least("eval.val_every", e.val_every, 0, " (0 disables)")
    at_least("eval.val_examples", e.val_examples, 0, " (0: none)")
    for key in ("val_subset", "num_beams", "max_new_tokens"):
        at_least(f"eval.{key}", getattr(e, key), 1)
    at_least("eval.no_repeat_ngram_size", e.no_repeat_ngram_size, 0)
    need(c.num_cpus is None or c.num_cpus >= 1, "cluster.num_cpus", f"must be >= 1 or null, got {c.num_cpus}")
    need(c.malloc_mmap_threshold_kb >= 0, "cluster.malloc_mmap_threshold_kb",
         f"must be >= 0, got {c.malloc_mmap_threshold_kb}")
    need(c.trim_heap_every_s >= 0, "cluster.trim_heap_every_s", f"must be >= 0, got {c.trim_heap_every_s}")
    need(c.head_timeout_s >= 0, "cluster.head_timeout_s", f"must be >= 0, got {c.head_timeout_s}")
    return cfg


def run_dir(cfg: RunConfig) -> Path:
    """``output_dir/run_name`` of a resolved config."""
    if cfg.run_name is None:
        raise ConfigError("run_name is not set: call resolve(cfg) first", key="run_name")
    return Path(cfg.output_dir) / cfg.run_name
