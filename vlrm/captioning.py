"""Captioning with any trained or released captioner: ``vlrm caption``, and the captioning half of
``vlrm evaluate``.

A model is named by a run folder (its exported ``policy/``), a checkpoint folder of a run
(``runs/NAME/checkpoints/step_000100``: the run's base model plus the checkpoint's weights), a
Hugging Face directory or a hub id. Decoding follows a preset or explicit options; the
``vlrm`` preset is the one reported for the paper's model (beam 5, no repeated bigrams, 4 to 60
new tokens).
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from vlrm.data import IMAGE_SUFFIXES, DatasetError, FolderSplit

__all__ = ["Decoding", "PRESETS", "load_captioner", "load_checkpoint_policy", "caption_images", "expand_images", "write_jsonl", "read_jsonl"]


@dataclass(frozen=True)
class Decoding:
    decoding: str = "greedy"  # greedy | beam
    num_beams: int = 5
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    max_new_tokens: int = 40

    def label(self) -> str:
        if self.decoding == "greedy":
            return f"greedy, {self.min_new_tokens}-{self.max_new_tokens} tokens"
        return (f"beam {self.num_beams}, no-repeat {self.no_repeat_ngram_size}, "
                f"{self.min_new_tokens}-{self.max_new_tokens} tokens")


PRESETS = {"greedy": Decoding(), "vlrm": Decoding("beam", 5, 2, 4, 60)}


def load_checkpoint_policy(ckpt: str | Path, device: str = "cpu", dtype: str | None = None,
                           run: str | Path | None = None) -> tuple[Any, Any]:
    """``(run config, policy)`` of a checkpoint folder (``runs/NAME/checkpoints/step_XXXXXX``): the
    base model of the run (``run``, default the folder the checkpoint sits in) with the checkpoint's
    weights, in ``dtype`` (default: the run's)."""
    from vlrm.policy import CaptionPolicy
    from vlrm.run import load_run_config

    ckpt = Path(ckpt)
    cfg = load_run_config(run if run is not None else ckpt.parent.parent)
    policy = CaptionPolicy.from_config(replace(cfg.policy, dtype=dtype or cfg.policy.dtype), device=device)
    policy.load_checkpoint(ckpt / "policy")
    return cfg, policy.train(False)


def load_captioner(spec: str, device: str = "cpu", dtype: str = "float32") -> Any:
    """A :class:`vlrm.policy.CaptionPolicy` for a run folder, a checkpoint folder, an HF directory
    or a hub id."""
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    path = Path(spec)
    if (path / "policy" / "config.json").is_file():  # a run folder: its exported policy
        path = path / "policy"
    if (path / "policy" / "policy.json").is_file() and (path.parent.parent / "config.yaml").is_file():
        return load_checkpoint_policy(path, device, dtype)[1]
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {spec}: not a run folder, a checkpoint folder or a Hugging Face "
                                "directory (no config.json)")
    # an HF directory (an exported policy has LoRA merged in) or a hub id
    policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(path) if path.exists() else spec, dtype=dtype,
                                                    lora_r=0), device=device)
    return policy.train(False)


def expand_images(items: Iterable[str]) -> list[Path]:
    """Image files from files, folders (searched recursively) and glob patterns, sorted per item."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(g) for g in glob.glob(item, recursive=True) if Path(g).is_file())
        if not found:
            raise DatasetError(f"no image found at {item!r}")
        out.extend(found)
    return out


def caption_images(policy: Any, images: Sequence[Any], decoding: Decoding, batch_size: int = 16,
                   progress: str | None = None) -> list[str]:
    """Captions of decoded images, in batches, with a progress bar when ``progress`` names one."""
    from tqdm.auto import tqdm

    captions: list[str] = []
    bar = tqdm(total=len(images), desc=progress, unit="img", disable=progress is None)
    for i in range(0, len(images), batch_size):
        pixels = policy.preprocess(list(images[i:i + batch_size]))
        captions += policy.caption(pixels, decoding=decoding.decoding, num_beams=decoding.num_beams,
                                   no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                                   max_new_tokens=decoding.max_new_tokens, min_new_tokens=decoding.min_new_tokens)
        bar.update(len(pixels))
    bar.close()
    return captions


def caption_files(policy: Any, paths: Sequence[Path], decoding: Decoding, batch_size: int = 16) -> tuple[list[dict], list[str]]:
    """``({"image", "caption"} records, errors)``, one batch decoded at a time (memory does not grow
    with the number of files); unreadable files are skipped and named."""
    from tqdm.auto import tqdm

    split = FolderSplit.of_files(paths, source="the given images")
    records, errors = [], []
    with tqdm(total=len(split), desc="captioning", unit="img") as bar:
        for start in range(0, len(split), batch_size):
            images, kept, bad = split.images(range(start, min(start + batch_size, len(split))), skip_bad=True)
            captions = caption_images(policy, images, decoding, batch_size) if images else []
            records += [{"image": split.path_of(r), "caption": c} for r, c in zip(kept, captions)]
            errors += bad
            bar.update(len(kept) + len(bad))
    return records, errors


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}, line {i}: not JSON ({e})") from e
    return out


def main(argv: Sequence[str]) -> list[dict]:
    """``vlrm caption --model M [--out captions.jsonl] IMAGES...``"""
    import argparse
    import sys

    import torch

    p = argparse.ArgumentParser(prog="vlrm caption", description="Caption image files, folders or globs into JSONL.")
    p.add_argument("images", nargs="+", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--model", required=True, help="run folder, checkpoint folder, HF directory or hub id")
    p.add_argument("--out", default=None, help="JSONL file ({image, caption} per line); default: standard output")
    p.add_argument("--preset", choices=sorted(PRESETS), default="greedy")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    a = p.parse_args(list(argv))
    decoding = PRESETS[a.preset]
    if a.max_new_tokens is not None:
        decoding = replace(decoding, max_new_tokens=a.max_new_tokens)
    policy = load_captioner(a.model, a.device, a.dtype)
    records, errors = caption_files(policy, expand_images(a.images), decoding, a.batch_size)
    for e in errors:
        print(f"vlrm caption: skipped an unreadable image: {e}", file=sys.stderr)
    if a.out:
        write_jsonl(records, a.out)
        print(f"{len(records)} captions -> {a.out}" + (f"; {len(errors)} unreadable images skipped" if errors else ""),
              file=sys.stderr)
    else:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))
    return records
