"""``vlrm export RUN --out DIR``: a run's trained captioner in the forms people load.

* ``DIR/hf/``: a full Hugging Face directory (LoRA merged into the LM) that
  ``Blip2ForConditionalGeneration.from_pretrained`` loads with no project code, with a model card;
* ``DIR/delta/``: the released-VLRM-style delta, ``vlrm-delta.pt`` (a plain state dict, readable
  with ``torch.load(weights_only=True)``) and ``vlrm-delta.safetensors`` (the same tensors:
  ``qformer.*``, ``query_tokens``, ``language_projection.*``), loaded onto the base model with
  ``load_state_dict(..., strict=False)``; and, when the run trained LoRA, ``adapter/`` in peft's
  format, which the delta alone cannot carry.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

__all__ = ["export_run", "model_card", "main"]

DELTA_PT = "vlrm-delta.pt"
DELTA_SAFETENSORS = "vlrm-delta.safetensors"


def _metrics(run: Path) -> dict:
    path = run / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def model_card(cfg: Any, step: int, evaluation: dict, has_lora: bool) -> str:
    """The model card of an exported run: base model, rewards and their weights, data, steps, evaluation."""
    rewards = "\n".join(f"| `{name}` | {c.weight:g} | "
                        + ", ".join(f"{k}={v!r}" for k, v in vars(c).items() if k not in ("weight",)) + " |"
                        for name, c in cfg.reward.components.items() if c.weight != 0)
    rows = []
    for key in ("clip_recall@1", "clip_recall@5", "clip_recall@10", "mean_words", "attribute_precision",
                "repetition_rate"):
        before, after = evaluation.get("before", {}).get(key), evaluation.get("after", {}).get(key)
        if after is not None:
            rows.append(f"| {key} | {before if before is None else f'{before:.3f}'} | {after:.3f} |")
    ev_after = evaluation.get("after", {})
    lora = ("LoRA was trained on the language model (r={r}, alpha={a}, on {m}): `delta/adapter/` holds it in peft's "
            "format; the delta files alone leave the LM at its base weights, so load the adapter too, or use "
            "`hf/`, where it is merged.").format(r=cfg.policy.lora_r, a=cfg.policy.lora_alpha,
                                                  m=", ".join(cfg.policy.lora_target_modules)) if has_lora else \
        "No LoRA was trained: the delta holds every trained BLIP-2 tensor."
    return f"""---
base_model: {cfg.policy.model_path}
library_name: transformers
pipeline_tag: image-to-text
tags: [vlrm, image-captioning, reinforcement-learning, blip-2]
---

# {cfg.run_name}: a BLIP-2 captioner tuned with vision-language reward models

Trained without human captions by RL with vision-language models as reward models (the method of
VLRM, Dzabraev, Kunitsyn, Ivaniuta, 2024): A2C with a learned value head, {step} learner steps of
{cfg.rollout.images_per_batch} images x {cfg.rollout.samples_per_image} sampled captions.

- **Base model**: `{cfg.policy.model_path}` ({cfg.policy.dtype})
- **Trained**: Q-Former {cfg.policy.train_qformer}, query tokens {cfg.policy.train_query_tokens}, language
  projection {cfg.policy.train_projection}, vision tower {cfg.policy.train_vision}, LoRA r={cfg.policy.lora_r}
- **Data**: `{cfg.data.source}` source at `{cfg.data.root}`, split `{cfg.data.train_split}` (images only)
- **Steps**: {step}

## Rewards

| component | weight | options |
|---|---|---|
{rewards}

## Evaluation

`{ev_after.get('split', cfg.eval.split)}`, decoding {ev_after.get('decoding', cfg.eval.decoding)}, evaluator CLIP
`{ev_after.get('evaluator', cfg.eval.evaluator_path)}`, gallery {ev_after.get('gallery_size', '?')} images:

| metric | base | tuned |
|---|---|---|
{chr(10).join(rows)}

## Use

```python
from transformers import Blip2ForConditionalGeneration, Blip2Processor
model = Blip2ForConditionalGeneration.from_pretrained("hf")           # this directory
processor = Blip2Processor.from_pretrained("hf")
```

or, in the released VLRM layout, onto the base model:

```python
import torch
model = Blip2ForConditionalGeneration.from_pretrained("{cfg.policy.model_path}")
model.load_state_dict(torch.load("delta/{DELTA_PT}", weights_only=True), strict=False)
```

{lora}
"""


def export_run(run: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export a run folder's newest (or the given) checkpoint into ``out``; returns ``out``."""
    from vlrm.captioning import load_checkpoint_policy
    from vlrm.run import CONFIG_FILE, latest_checkpoint

    run = Path(run).resolve()
    if not (run / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a run folder (no {CONFIG_FILE})")
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"{run} has no checkpoint to export")
    cfg, policy = load_checkpoint_policy(ckpt, run=run)
    step = json.loads((ckpt / "state.json").read_text())["step"]
    out = Path(out)
    delta_dir = out / "delta"
    delta_dir.mkdir(parents=True, exist_ok=True)
    delta = {k: v.detach().cpu().contiguous() for k, v in policy.released_state_dict().items()}
    torch.save(delta, delta_dir / DELTA_PT)
    save_file(delta, str(delta_dir / DELTA_SAFETENSORS), metadata={"format": "pt", "base_model": cfg.policy.model_path})
    adapter = ckpt / "policy" / "adapter"
    has_lora = adapter.is_dir()
    if has_lora:
        shutil.copytree(adapter, delta_dir / "adapter", dirs_exist_ok=True)
    policy.export_pretrained(out / "hf", save_value_head=False)
    card = model_card(cfg, int(step), _metrics(run), has_lora)
    for where in (out, out / "hf"):
        (where / "README.md").write_text(card, encoding="utf-8")
    return out


def main(argv: Sequence[str]) -> Path:
    p = argparse.ArgumentParser(prog="vlrm export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder (runs/NAME or runs/latest)")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", default=None, help="a checkpoint folder of the run (default: its newest)")
    a = p.parse_args(list(argv))
    out = export_run(a.run, a.out, a.checkpoint)
    print(f"exported {a.run} -> {out}/hf (Hugging Face, model card) and {out}/delta (released-style delta)")
    return out
