"""The ``vllm`` generation backend: BLIP-2 captions from a vLLM engine inside the rollout actor,
with in-place weight updates between batches.

vLLM pins torch and transformers versions of its own, so this module runs in a second Python
environment (``make vllm-env``; the rollout actor gets it through Ray's ``runtime_env``
``py_executable``, :func:`vllm_runtime_env`). Only this module imports vLLM, and only when an
engine is built, so the learner can read :attr:`VLLMBackend.weights_format` without it.

* **Prompt.** The policy's prompt (:meth:`vlrm.policy.CaptionPolicy._prompt`): the image's ``Q``
  query outputs, then BOS. Given ``[BOS]`` and the image, vLLM's BLIP-2 processor inserts the
  ``Q`` image placeholders in front, which gives the same sequence.
* **Log-probs.** The engine runs with ``logprobs_mode="processed_logprobs"``: the log-prob of each
  sampled token after temperature and top-k/top-p, i.e. of the distribution actually sampled, as
  :meth:`CaptionPolicy.sample` records them. EOS is kept in the tokens (masked in), padding after.
* **Weights** arrive in the ``"hf"`` form (:meth:`CaptionPolicy.hf_state_dict`: BLIP-2 names,
  LoRA merged into the projections it adapts) and go through vLLM's in-place reload
  (``reload_weights``, which redoes the per-layer post-processing such as CPU weight packing). That
  reload works per vLLM layer, so a push that holds only part of a fused layer (``q_proj`` and
  ``v_proj`` of the fused ``qkv_proj``) is completed with the frozen siblings (``k_proj``) read
  once from the model's safetensors. Prefix, encoder and multi-modal caches are reset afterwards
  (they hold activations of the old weights).
* **Engine in the actor's process** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): pushed tensors reach
  the model without another serialisation, and the actor's resources are the engine's.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vlrm.policy import Samples, mask_through_eos

__all__ = ["VLLMBackend", "vllm_runtime_env", "packed_siblings"]

# vLLM reads these at import
_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def vllm_runtime_env(python: str) -> dict:
    """``runtime_env`` of a vllm rollout actor: the vLLM environment's interpreter, and vLLM's
    engine in the actor's own process."""
    return {"py_executable": python, "env_vars": dict(_ENGINE_ENV)}


def packed_siblings(names: Sequence[str], packed: Mapping[str, Sequence[str]], available: Sequence[str]) -> list[str]:
    """Checkpoint names that must come with ``names`` so that every fused vLLM layer they touch is
    loaded whole: for ``...self_attn.q_proj.weight`` and ``packed = {"qkv_proj": ["q_proj",
    "k_proj", "v_proj"]}``, ``...k_proj.weight`` and ``...v_proj.weight`` when absent from ``names``
    and present in ``available``. Pure function (tests call it on plain lists)."""
    have, avail = set(names), set(available)
    group_of = {leaf: group for group in packed.values() for leaf in group}
    extra: list[str] = []
    for n in names:
        parts = n.split(".")
        if len(parts) < 3 or parts[-2] not in group_of:
            continue
        for sib in group_of[parts[-2]]:
            m = ".".join(parts[:-2] + [sib, parts[-1]])
            if m not in have and m in avail and m not in extra:
                extra.append(m)
    return extra


def _checkpoint_files(model_path: str) -> dict[str, Path]:
    """Tensor name -> safetensors file of a local HF checkpoint (sharded or not)."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        return {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = root / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{root}: no model.safetensors(.index.json); the vllm backend needs a local "
                                "safetensors checkpoint for policy.model_path")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


class VLLMBackend:
    """A vLLM engine over ``cfg.policy.model_path`` (see the module docstring).

    ``policy``: not supported (the engine holds its own weights); the single-process mode is
    refused by the config check before anything loads.
    """

    name = "vllm"
    weights_format = "hf"

    def __init__(self, cfg: Any, device: str = "cpu", policy: Any = None):
        if policy is not None:
            raise ValueError("the vllm backend holds its own engine and cannot sample with another process's "
                             "policy: use --mode async or sync")
        for k, v in _ENGINE_ENV.items():
            os.environ.setdefault(k, v)
        vc = cfg.rollout.vllm
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(vc.cpu_kv_cache_gib)))
            # Ray already pins the actor; vLLM's own OpenMP binding would fight other roles for cores
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError(f"rollout.backend=vllm: vllm is not importable by {sys.executable} ({e}). Build "
                              "the vLLM environment with 'make vllm-env' and point rollout.vllm.python at it") from e
        self.cfg = cfg
        self.version = 0
        self.model_path = cfg.policy.model_path
        kwargs: dict[str, Any] = dict(
            model=self.model_path, dtype=cfg.policy.dtype, seed=int(cfg.seed), enforce_eager=bool(vc.enforce_eager),
            logprobs_mode="processed_logprobs", max_num_seqs=int(vc.max_num_seqs), limit_mm_per_prompt={"image": 1})
        if vc.max_model_len:
            kwargs["max_model_len"] = int(vc.max_model_len)
        if device != "cpu":
            kwargs["gpu_memory_utilization"] = float(vc.gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.bos_token_id = int(self.tokenizer.bos_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        self._packed = self.llm.apply_model(_packed_modules)[0]
        self._files: dict[str, Path] | None = None
        self._frozen: dict[str, torch.Tensor] = {}  # fused-layer siblings read from the checkpoint
        # frozen layers are left out of a push on purpose: vLLM's "Failed to load weights" per layer is noise
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        if getattr(cfg.policy, "init_from", None):  # a released delta onto the base model, as the learner does
            from vlrm.policy_weights import read_delta

            self.load_weights(read_delta(cfg.policy.init_from), 0)

    # ------------------------------------------------------------------ generation

    def _prompts(self, images: Sequence[Any]) -> list[dict]:
        return [{"prompt_token_ids": [self.bos_token_id], "multi_modal_data": {"image": im}} for im in images]

    def _texts(self, token_lists: Sequence[Sequence[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode([list(t) for t in token_lists], skip_special_tokens=True)]

    def generate(self, images: Sequence[Any], k: int, seed: int | None = None) -> Samples:
        """``k`` sampled captions per image (``SamplingParams(n=k)``); one seed per image, derived
        from ``seed``, so a retried batch samples the same captions."""
        from vllm import SamplingParams

        r = self.cfg.rollout
        base = dict(n=int(k), temperature=float(r.temperature), top_k=int(r.top_k) if r.top_k > 0 else -1,
                    top_p=float(r.top_p), max_tokens=int(r.max_new_tokens), min_tokens=int(r.min_new_tokens),
                    logprobs=0, detokenize=False)
        params = [SamplingParams(**base, seed=None if seed is None else int(seed) + i) for i in range(len(images))]
        outs = self.llm.generate(self._prompts(images), params, use_tqdm=False)
        seqs, lps = [], []
        for o in outs:
            for c in sorted(o.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                seqs.append(ids)
                lps.append([d[t].logprob for t, d in zip(ids, c.logprobs)])
        b, t = len(seqs), max([len(s) for s in seqs] + [1])
        tokens = torch.full((b, t), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((b, t), dtype=torch.float32)
        for i, (ids, lp) in enumerate(zip(seqs, lps)):
            tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        mask = mask_through_eos(tokens, self.eos_token_id) & (torch.arange(t)[None, :] < torch.tensor(
            [len(s) for s in seqs])[:, None])
        tokens[~mask] = self.pad_token_id
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
        texts = self._texts([s[:int(m.sum())] for s, m in zip(seqs, mask)])
        image_index = torch.arange(len(images)).repeat_interleave(int(k))
        return Samples(tokens=tokens, mask=mask, logprobs=logprobs, image_index=image_index, texts=texts, k=int(k),
                       version=int(self.version), sampling={kk: base[kk] for kk in ("temperature", "top_k", "top_p")})

    def caption(self, images: Sequence[Any], decoding: str = "greedy", num_beams: int = 5,
                no_repeat_ngram_size: int = 0, max_new_tokens: int = 40, min_new_tokens: int = 0) -> list[str]:
        """Deterministic captions: ``greedy`` (temperature 0; token for token the transformers
        policy's) or ``beam`` (vLLM's own beam search, which ranks beams differently from
        transformers': on the shapes captioner 2 of 8 beam captions agreed at 3 beams, so the
        numbers of ``vlrm evaluate`` and the run's evaluations come from transformers)."""
        if no_repeat_ngram_size:
            raise ValueError("the vllm backend has no no_repeat_ngram_size: caption with the hf backend")
        if decoding == "greedy":
            from vllm import SamplingParams

            sp = SamplingParams(temperature=0.0, max_tokens=int(max_new_tokens), min_tokens=int(min_new_tokens),
                                detokenize=False)
            outs = self.llm.generate(self._prompts(images), sp, use_tqdm=False)
            return self._texts([o.outputs[0].token_ids for o in outs])
        if decoding == "beam":
            from vllm.sampling_params import BeamSearchParams

            bp = BeamSearchParams(beam_width=int(num_beams), max_tokens=int(max_new_tokens))
            outs = self.llm.beam_search(self._prompts(images), bp)
            prompt_len = int(self.llm.llm_engine.model_config.hf_config.num_query_tokens) + 1  # image tokens + BOS
            return self._texts([o.sequences[0].tokens[prompt_len:] for o in outs])
        raise ValueError(f"decoding must be 'greedy' or 'beam', got {decoding!r}")

    # ------------------------------------------------------------------ weights

    def _complete(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        need = packed_siblings(list(state), self._packed, list(self._files))
        missing = [n for n in need if n not in self._frozen]
        if missing:
            from safetensors import safe_open

            by_file: dict[Path, list[str]] = {}
            for n in missing:
                by_file.setdefault(self._files[n], []).append(n)
            for f, names in by_file.items():
                with safe_open(str(f), "pt") as h:
                    for n in names:
                        self._frozen[n] = h.get_tensor(n)
        return dict(state) | {n: self._frozen[n] for n in need}

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Swap pushed weights (``"hf"`` names) into the running engine between batches."""
        if self._files is None:
            self._files = _checkpoint_files(self.model_path)
        unknown = [n for n in state if n not in self._files]
        if unknown:
            raise KeyError(f"pushed weights not in {self.model_path}: {unknown[:3]}")
        full = self._complete(state)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(full.items()),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.version = int(version)


def _packed_modules(model: Any) -> dict[str, list[str]]:
    """``packed_modules_mapping`` of every submodule (fused layer -> the checkpoint layers in it)."""
    out: dict[str, list[str]] = {}
    for mod in model.modules():
        for k, v in (getattr(mod, "packed_modules_mapping", None) or {}).items():
            out[k] = list(v)
    return out


def check_vllm_environment(cfg: Any, local_cluster: bool = True) -> None:
    """Before any actor loads a model: the vLLM environment exists, imports vLLM, and has this
    Ray version (Ray's workers must all run one version). On a remote cluster the interpreter is
    on the worker nodes, so only the config is checked here. Makes ``rollout.vllm.python``
    absolute (not symlink-resolved: a venv's python is a symlink to the base interpreter)."""
    import subprocess

    import ray

    from vlrm.config_schema import ConfigError

    python = cfg.rollout.vllm.python
    if not python:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"rollout.backend=vllm with rollout.vllm.python empty, but vllm is not importable by "
                              f"{sys.executable}: build the vLLM environment with 'make vllm-env' and set "
                              "rollout.vllm.python=.venv-vllm/bin/python", key="rollout.vllm.python")
        return
    if not local_cluster:
        return
    python = os.path.abspath(python)
    if not os.path.exists(python):
        raise ConfigError(f"rollout.vllm.python: {python} does not exist; build the vLLM environment with "
                          "'make vllm-env' (or point the key at a Python that has vllm and ray "
                          f"{ray.__version__})", key="rollout.vllm.python")
    probe = subprocess.run([python, "-c", "import ray, vllm; print(ray.__version__, vllm.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise ConfigError(f"rollout.vllm.python: {python} cannot import vllm and ray ({last}); rebuild it with "
                          "'make vllm-env'", key="rollout.vllm.python")
    theirs = probe.stdout.split()[0]
    if theirs != ray.__version__:
        raise ConfigError(f"rollout.vllm.python: {python} has Ray {theirs}, this driver Ray {ray.__version__}; "
                          "every Ray worker must run the same version ('make vllm-env' installs the driver's)",
                          key="rollout.vllm.python")
    cfg.rollout.vllm.python = python
