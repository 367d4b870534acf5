"""``vlrm evaluate``: the numbers a captioning paper reports, for any model on any data.

    vlrm evaluate --model runs/latest --data ../data/dataset_coco.json --split test --preset vlrm
    vlrm evaluate --captions mine.jsonl --data images/ --clip ViT-B-32/openai --out eval.json
    vlrm evaluate --model base/ --compare runs/a runs/b --data data/shapes --split test
    vlrm evaluate --model Salesforce/blip2-opt-2.7b --compare Salesforce/blip2-opt-2.7b+vlrm-blip2-opt-2.7b.pt \
        Salesforce/blip2-opt-2.7b+vlrm-rs-blip2-opt-2.7b.pt runs/latest --data dataset_coco.json --report cmp.html

``--data`` is a Karpathy split file (images beside it unless ``--image-root`` says otherwise), a
Parquet file, an image folder, or a folder of splits (a shapes world is recognised by its
``meta.json``). Metrics: CLIP Recall R@1/5/10 (caption -> image over the evaluated images, with
the CLIP ``--clip``; model and gallery size are stored with the numbers), CLIPScore, and where the
data has human references RefCLIPScore, BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and
SPICE when its files are present; CHAIR-i and CHAIR-s with ``--chair`` COCO instance
annotations (:mod:`vlrm.chair`); text statistics; a data source's own ground truth (the shapes
world's attribute precision and recall).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

from vlrm.captioning import PRESETS, Decoding, caption_images, load_captioner, read_jsonl
from vlrm.caption_metrics import clip_scores, coco_caption_scores, text_statistics
from vlrm.data import DatasetError, DataSource, open_source, open_split
from vlrm.metrics import retrieval_recall

__all__ = ["main", "evaluate", "open_data", "TABLE_KEYS"]

TABLE_KEYS = ("clip_recall@1", "clip_recall@5", "clip_recall@10", "CLIPScore", "RefCLIPScore", "BLEU-1", "BLEU-4",
              "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CHAIR_i", "CHAIR_s", "mean_words", "vocabulary", "distinct_captions",
              "bad_phrase_rate", "repetition_rate", "attribute_precision", "attribute_recall")


def open_data(spec: str, split: str | None, image_root: str | None = None, cache_mb: float = 256.0) -> tuple[Any, DataSource | None]:
    """``(split, source)`` for ``--data``; the source is None for a bare file or folder of images."""
    from vlrm.config import from_dict

    path = Path(spec)
    if not path.exists():
        raise DatasetError(f"--data {spec}: not found")
    if path.suffix == ".json":
        source_name = "karpathy"
    elif path.is_dir() and (path / "meta.json").is_file():
        source_name = "shapes"
    elif path.is_dir() and split and (path / f"{split}.parquet").is_file():
        source_name = "parquet"
    elif path.is_dir() and split and (path / split).is_dir():
        source_name = "folder"
    else:
        return open_split(path, cache_mb), None
    cfg = from_dict({"data": {"source": source_name, "root": str(path), "image_root": image_root,
                              "cache_mb": cache_mb}}).data
    source = open_source(cfg)
    return source.split(split or "test"), source


def evaluate(captions: Sequence[str], rows: Sequence[int], split: Any, source: DataSource | None, clip: Any,
             spice: bool = False, images: Sequence[Any] | None = None, chair: Any = None) -> dict:
    """Every metric of ``captions[i]`` for image ``rows[i]`` of ``split`` (``images``: those rows,
    when the caller has decoded them already; ``chair``: a :class:`vlrm.chair.CocoObjects`)."""
    errors: list[str] = []
    if images is None:
        images, kept, errors = split.images(list(rows), skip_bad=True)
        if errors:
            keep = set(kept)
            captions = [c for r, c in zip(rows, captions) if r in keep]
    else:
        kept = list(rows)
    captions = list(captions)
    references = split.column("references", kept)
    out: dict[str, Any] = {"images": len(kept), "bad_images": len(errors), "clip": clip.model_spec,
                           "gallery_size": len(kept)}
    features = clip.encode_images(list(images)), clip.encode_texts(captions)  # once, for every CLIP metric
    sim = clip.similarity(*features)
    out |= {f"clip_recall@{k}": v for k, v in retrieval_recall(sim, torch.arange(len(kept)), (1, 5, 10)).items()}
    scores = clip_scores(clip, images, captions, references, features)
    out |= {k: v for k, v in scores.items() if k != "per_caption"}
    if references:
        out |= coco_caption_scores({i: refs for i, refs in enumerate(references)},
                                   {i: c for i, c in enumerate(captions)}, spice=spice)
    if chair is not None:
        paths = split.column("path", kept)
        if not paths:
            raise DatasetError(f"--chair needs the images' file names, and {split.source} has none")
        out |= chair.chair(captions, paths)
    out |= text_statistics(captions)
    if source is not None:
        out |= source.ground_truth(split, kept, captions)
    out["examples"] = [{"row": r, "caption": c} for r, c in list(zip(kept, captions))[:12]]
    return out


def table(results: dict[str, dict]) -> str:
    """One screen: a row per metric, a column per evaluated model."""
    names = list(results)
    keys = [k for k in TABLE_KEYS if any(k in r for r in results.values())]
    width = max([len(k) for k in keys] + [10])
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{n[-18:]:>18}" for n in names)]
    for k in keys:
        vals = [results[n].get(k) for n in names]
        lines.append(f"{k:<{width}}  " + "  ".join(f"{v:>18.4f}" if isinstance(v, (int, float)) else f"{'-':>18}"
                                                    for v in vals))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlrm evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run folder, checkpoint folder, HF directory or hub id")
    p.add_argument("--captions", help="JSONL of {image or row, caption} made elsewhere, instead of --model")
    p.add_argument("--delta", help="a released-style delta (.pt read weights-only, or .safetensors) loaded onto --model")
    p.add_argument("--compare", nargs="*", default=[], help="more models, side by side with --model; "
                   "MODEL+DELTA.pt loads a released-style delta onto MODEL")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default=None, help="split name (default test); train+restval joins Karpathy splits")
    p.add_argument("--image-root", default=None, help="images of a Karpathy split file (default: beside it)")
    p.add_argument("--clip", default="ViT-B-32/openai", help="CLIP for recall and CLIPScore (local dir or arch/tag)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--preset", choices=sorted(PRESETS), default="greedy", help="decoding preset (vlrm: beam 5, "
                   "no-repeat 2, 4-60 tokens)")
    for name, tp in (("decoding", str), ("num-beams", int), ("no-repeat-ngram-size", int), ("min-new-tokens", int),
                     ("max-new-tokens", int)):
        p.add_argument(f"--{name}", type=tp, default=None, help="overrides the preset")
    p.add_argument("--spice", action="store_true", help="also SPICE (needs Stanford CoreNLP's files)")
    p.add_argument("--chair", default=None, help="COCO instances file (instances_val2014.json): also CHAIR-i/CHAIR-s")
    p.add_argument("--chair-synonyms", default=None, help="the CHAIR paper's synonyms.txt instead of the built-in table")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--report", default=None, help="write a self-contained HTML page here: the models' captions "
                   "side by side on the first images, and the metric table (with --compare by default: beside "
                   "--out, or compare.html)")
    return p


def main(argv: Sequence[str]) -> dict:
    a = _parser().parse_args(list(argv))
    if bool(a.model) == bool(a.captions):
        raise DatasetError("give --model or --captions (one of them)")
    from vlrm.clip import ClipModel

    split, source = open_data(a.data, a.split, a.image_root)
    n = len(split) if a.limit is None else min(a.limit, len(split))
    decoding = PRESETS[a.preset]
    overrides = {k: getattr(a, k) for k in ("decoding", "num_beams", "no_repeat_ngram_size", "min_new_tokens",
                                            "max_new_tokens") if getattr(a, k) is not None}
    decoding = Decoding(**(asdict(decoding) | overrides))
    clip = ClipModel(a.clip, device=a.device)
    chair = None
    if a.chair:
        from vlrm.chair import CocoObjects

        chair = CocoObjects(a.chair, a.chair_synonyms)
    results: dict[str, dict] = {}
    if a.captions:
        records = read_jsonl(a.captions)
        paths = split.column("path") or []
        index = {p: i for i, p in enumerate(paths)}
        rows, caps = [], []
        for r in records:
            row = r.get("row", index.get(str(r.get("image"))))
            if row is None:
                raise DatasetError(f"{a.captions}: {r.get('image')!r} is not an image of {split.source}")
            rows.append(int(row))
            caps.append(str(r["caption"]))
        results[a.captions] = evaluate(caps, rows, split, source, clip, a.spice, chair=chair) | {"decoding": "given"}
    specs = [(a.model, a.delta)] if a.model else []
    specs += [_split_delta(c) for c in a.compare]
    if specs:  # every model captions the same images, decoded once
        images, kept, errors = split.images(list(range(n)), skip_bad=True)
    for model, delta in specs:
        policy = load_captioner(model, a.device, a.dtype)
        spec = model
        if delta:
            policy.load_delta(delta)
            spec = f"{model} + {delta}"
        caps = caption_images(policy, images, decoding, a.batch_size, progress=f"captioning ({spec})")
        results[spec] = evaluate(caps, kept, split, source, clip, a.spice, images, chair) | {"decoding": decoding.label()}
        results[spec]["bad_images"] += len(errors)
    print(f"data {a.data} ({split.source}), {n} images; CLIP {a.clip}; decoding {decoding.label()}")
    print(table(results))
    out = {"data": a.data, "split": a.split or "test", "clip": a.clip, "results": results}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=2, sort_keys=True))
    report = a.report or ((str(Path(a.out).with_suffix(".html")) if a.out else "compare.html") if a.compare else None)
    if report:
        _report(report, a.data, split, results)
        print(f"report: {report}")
    return out


def _split_delta(spec: str) -> tuple[str, str | None]:
    """``MODEL+DELTA`` in ``--compare``: a released-style delta file loaded onto MODEL."""
    model, sep, delta = spec.rpartition("+")
    if sep and delta.endswith((".pt", ".pth", ".safetensors")):
        return model, delta
    return spec, None


def _report(path: str, data: str, split: Any, results: dict[str, dict]) -> None:
    from vlrm.report import write_report

    rows = [e["row"] for e in next(iter(results.values()))["examples"]]
    by_row = {name: {e["row"]: e["caption"] for e in r["examples"]} for name, r in results.items()}
    images, kept, _ = split.images(rows, skip_bad=True)
    refs = split.column("references", kept)
    gallery = [{"image": im, "label": f"row {r}" + (f"; a human caption: {refs[i][0]}" if refs and refs[i] else ""),
                "captions": {name: caps[r] for name, caps in by_row.items() if r in caps}}
               for i, (r, im) in enumerate(zip(kept, images))]
    write_report(path, f"vlrm evaluate: {data}", results, gallery)
