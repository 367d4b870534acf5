"""The weights of a :class:`vlrm.policy.CaptionPolicy` in every form they leave it in: the
trainable tensors a learner pushes, the same under plain HF names with LoRA merged (for an
inference engine), the released-VLRM-style delta, checkpoints and the exported HF directory."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["PolicyWeights", "read_delta", "TRAINABLE_FILE", "ADAPTER_DIR", "VALUE_HEAD_FILE", "META_FILE"]

TRAINABLE_FILE = "trainable.safetensors"
ADAPTER_DIR = "adapter"
VALUE_HEAD_FILE = "value_head.safetensors"
META_FILE = "policy.json"


def read_delta(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a released-style delta (``qformer.*``, ``query_tokens``,
    ``language_projection.*``): ``.safetensors``, or a torch state dict read with
    ``torch.load(weights_only=True)``; a file that needs full unpickling is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no delta file at {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # a truncated or corrupt file: safetensors' own error names no file
            raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and the loader's own errors
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True), so it is not loaded (it would "
                         f"need unrestricted unpickling, which can run code): {type(e).__name__}: "
                         f"{str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{path} is not a state dict of named tensors")
    return sd


def _is_lora(name: str) -> bool:
    return "lora_" in name


class PolicyWeights:
    """Weight methods of :class:`vlrm.policy.CaptionPolicy` (``model``, ``_peft``, ``value_head``,
    ``processor``, ``config`` and ``version`` are the policy's)."""

    def trainable_state_dict(self, device: str | torch.device | None = "cpu") -> dict[str, Tensor]:
        """The trainable tensors only (Q-Former, query tokens, projection, LoRA, value head): what a
        learner pushes to actors. Detached copies on ``device``; with None, the parameters themselves,
        detached, no copy (for a caller that copies them before the next update, as the packed wire does)."""
        return {n: p.detach().to(device, copy=True) if device is not None else p.detach()
                for n, p in self.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def load_trainable_state_dict(self, sd: dict[str, Tensor], strict: bool = True) -> None:
        """Copy the tensors of :meth:`trainable_state_dict` (from a policy of the same config) in place."""
        params = dict(self.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        unexpected = sorted(set(sd) - set(params))
        missing = sorted(expected - set(sd))
        if unexpected or (strict and missing):
            raise KeyError(f"trainable state dict does not match this policy: missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                           f"{'...' if len(unexpected) > 5 else ''}")
        for n, v in sd.items():
            p = params[n]
            if p.shape != v.shape:
                raise ValueError(f"{n}: shape {tuple(v.shape)} does not match the policy's {tuple(p.shape)}")
            p.copy_(v.to(p.device, p.dtype))

    @torch.no_grad()
    def hf_state_dict(self) -> dict[str, Tensor]:
        """The trainable weights under plain ``Blip2ForConditionalGeneration`` names, with LoRA merged
        into each projection it adapts (``base + scale * B @ A`` under the base weight's name): the
        form an engine that holds the HF model (vLLM) loads. Loaded into the base model with
        ``load_state_dict(strict=False)`` it captions as this policy does."""
        out = dict(self.released_state_dict())
        if self._peft is not None:
            from peft.tuners.lora import LoraLayer

            for name, module in self.model.named_modules():
                if isinstance(module, LoraLayer):
                    base = module.get_base_layer()
                    delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                    out[f"{name}.weight"] = (base.weight + delta.to(base.weight.dtype)).contiguous()
                    if getattr(base, "bias", None) is not None:
                        out[f"{name}.bias"] = base.bias.detach()
        return out

    def released_state_dict(self) -> dict[str, Tensor]:
        """The released-VLRM-style partial state dict: trainable BLIP-2 tensors (no LoRA, no value
        head) under ``Blip2ForConditionalGeneration`` names (``qformer.*``, ``query_tokens``,
        ``language_projection.*``; ``vision_model.*`` if it trains)."""
        return {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad and not _is_lora(n)}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write ``trainable.safetensors`` (released style), ``adapter/`` (peft, when LoRA is on),
        ``value_head.safetensors`` and ``policy.json`` (version and config) into ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in self.released_state_dict().items()}, str(path / TRAINABLE_FILE),
                  metadata={"format": "pt"})
        if self._peft is not None:
            self._peft.save_pretrained(str(path / ADAPTER_DIR), safe_serialization=True)
        self._save_value_head(path)
        meta = {"version": int(self.version), "config": dataclasses.asdict(self.config)}
        (path / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return path

    def _save_value_head(self, path: Path) -> None:
        vh = self.value_head
        save_file({k: v.detach().cpu().contiguous() for k, v in vh.state_dict().items()}, str(path / VALUE_HEAD_FILE),
                  metadata={"format": "pt", "lm_hidden": str(vh.lm_hidden), "use_query": str(vh.use_query),
                            "query_dim": str(vh.query_dim), "hidden": str(vh.net[0].out_features)})

    @torch.no_grad()
    def load_checkpoint(self, path: str | Path, strict: bool = True) -> None:
        """Load :meth:`save_checkpoint` output. ``path`` may also be a single ``.safetensors`` file
        of BLIP-2 names (the released VLRM weights), loaded with ``strict=False`` semantics.

        Unknown tensor names always raise; with ``strict``, trainable tensors missing from the
        checkpoint (and a missing adapter or value head) raise too.
        """
        path = Path(path)
        if path.is_file():
            self._load_released(load_file(str(path)), strict=False)
            return
        if not path.is_dir():
            raise FileNotFoundError(f"no policy checkpoint at {path}")
        self._load_released(load_file(str(path / TRAINABLE_FILE)), strict=strict)
        adapter = path / ADAPTER_DIR / "adapter_model.safetensors"
        if self._peft is not None:
            if adapter.is_file():
                from peft import set_peft_model_state_dict

                res = set_peft_model_state_dict(self._peft, load_file(str(adapter)))
                bad = [k for k in getattr(res, "unexpected_keys", []) if _is_lora(k)]
                if bad:
                    raise KeyError(f"adapter in {adapter.parent} does not match this policy's LoRA: {bad[:5]}")
            elif strict:
                raise FileNotFoundError(f"{adapter} missing (policy has LoRA r={self.config.lora_r})")
        elif adapter.is_file():
            raise ValueError(f"checkpoint {path} has a LoRA adapter but this policy has lora_r=0")
        vh = path / VALUE_HEAD_FILE
        if vh.is_file():
            self.value_head.load_state_dict({k: v.to(self.device) for k, v in load_file(str(vh)).items()})
        elif strict:
            raise FileNotFoundError(f"{vh} missing")
        meta = path / META_FILE
        if meta.is_file():
            self.version = int(json.loads(meta.read_text(encoding="utf-8")).get("version", self.version))

    def load_delta(self, path: str | Path) -> None:
        """Load a released-VLRM-style delta onto this policy's base model (``strict=False``, as the
        model card does): a ``.pt`` / ``.pth`` state dict read with ``torch.load(weights_only=True)``,
        or a ``.safetensors`` file; tensors are cast to the model's dtype."""
        sd = read_delta(path)
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        bad = [f"{k}: {tuple(v.shape)} vs the model's {tuple(own[k].shape)}" for k, v in sd.items()
               if k in own and own[k].shape != v.shape]
        if bad:
            raise ValueError(f"delta {path} is for another model: {bad[:3]}")
        unknown = sorted(k for k in sd if k not in own)
        if unknown:
            raise ValueError(f"delta {path} is for another model: tensors this BLIP-2 does not have: {unknown[:3]}")
        self._load_released({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()}, strict=False)

    def _load_released(self, sd: dict[str, Tensor], strict: bool) -> None:
        res = self.model.load_state_dict(sd, strict=False)
        if res.unexpected_keys:
            raise KeyError(f"unknown BLIP-2 tensors in checkpoint: {res.unexpected_keys[:5]}")
        if strict:
            missing = sorted(set(self.released_state_dict()) - set(sd))
            if missing:
                raise KeyError(f"checkpoint lacks trainable tensors {missing[:5]}")

    def export_pretrained(self, path: str | Path, save_value_head: bool = True) -> Path:
        """A full Hugging Face directory (LoRA merged into a copy of the LM, processor saved):
        ``Blip2ForConditionalGeneration.from_pretrained(path)`` gives the same captions.
        Also writes ``value_head.safetensors`` (ignored by ``from_pretrained``) unless told not to."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        lm = self.model.language_model
        merged = copy.deepcopy(self._peft).merge_and_unload() if self._peft is not None else copy.deepcopy(lm)
        self.model._modules["language_model"] = None
        try:
            shell = copy.deepcopy(self.model)
        finally:
            self.model._modules["language_model"] = lm
        shell.language_model = merged
        for p in shell.parameters():
            p.requires_grad_(True)
        shell.save_pretrained(str(path), safe_serialization=True)
        self.processor.save_pretrained(str(path))
        if save_value_head:
            self._save_value_head(path)
        del shell, merged
        return path
