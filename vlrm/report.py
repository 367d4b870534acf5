"""A self-contained HTML page of a run or a comparison: a gallery of images with each model's
caption (and, for a run, every reward component of the base and tuned captions), the metric
tables and the learning curves. Everything is inline (images as data URIs, no scripts or styles
from the network), so the page opens anywhere, offline.

The page checks itself once loaded: ``<body data-images="ok N">`` when every image decoded
(``naturalWidth > 0``), ``"broken K of N"`` otherwise; the report test reads it in Chromium.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["write_report", "image_uri"]

METRICS = ("clip_recall@1", "clip_recall@5", "clip_recall@10", "CLIPScore", "RefCLIPScore", "BLEU-4", "METEOR",
           "ROUGE-L", "CIDEr", "mean_words", "color_word_rate", "attribute_precision", "attribute_recall",
           "repetition_rate", "distinct_captions")

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}td.t{text-align:left}
.g{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:14px}
.c{border:1px solid #ddd;border-radius:6px;padding:8px}.c img{width:100%;image-rendering:pixelated}
.cap{margin:4px 0}.m{color:#666;font-size:.85em}"""

_CHECK = """addEventListener('load',()=>{const i=[...document.images];const b=i.filter(x=>!x.complete||!x.naturalWidth);
document.body.dataset.images=b.length?`broken ${b.length} of ${i.length}`:`ok ${i.length}`;});"""


def image_uri(image: Any, fmt: str = "PNG") -> str:
    """A PIL image (or PNG/JPEG bytes) as a data URI."""
    if isinstance(image, (bytes, bytearray)):
        data, mime = bytes(image), "image/png" if bytes(image[:4]) == b"\x89PNG" else "image/jpeg"
    else:
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format=fmt)
        data, mime = buf.getvalue(), f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))


def _metric_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    names = list(results)
    keys = [k for k in METRICS if any(k in r for r in results.values())]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(f"<tr><td class=t>{k}</td>" + "".join(f"<td>{_fmt(results[n].get(k, '-'))}</td>" for n in names)
                   + "</tr>" for k in keys)
    return f"<table><tr><th>metric</th>{head}</tr>{rows}</table>"


def write_report(path: str | Path, title: str, results: Mapping[str, Mapping[str, Any]],
                 gallery: Sequence[Mapping[str, Any]], curve_png: str | Path | None = None,
                 notes: Sequence[str] = ()) -> Path:
    """Write the page.

    Args:
        results: ``{model name: metrics}`` (a run: ``{"base": before, "tuned": after}``).
        gallery: one entry per image: ``{"image": PIL image or bytes, "label": str, "captions":
            {model name: caption}, "rewards": {model name: {component: value}}}`` (rewards optional).
        curve_png: the learning-curve PNG, embedded when given.
    """
    cards = []
    for g in gallery:
        caps = "".join(
            f"<p class=cap><b>{html.escape(name)}</b>: <span class=caption>{html.escape(cap)}</span>"
            + ("<br><span class=m>" + ", ".join(f"{k} {(v or 0.0):.3f}" for k, v in g['rewards'][name].items()) + "</span>"
               if g.get("rewards", {}).get(name) else "") + "</p>"
            for name, cap in g["captions"].items())
        cards.append(f"<div class=c><img alt='{html.escape(g.get('label', ''))}' src='{image_uri(g['image'])}'>"
                     f"<div class=m>{html.escape(g.get('label', ''))}</div>{caps}</div>")
    curve = (f"<h2>Learning curves</h2><img alt='learning curves' style='max-width:900px' "
             f"src='{image_uri(Path(curve_png).read_bytes())}'>") if curve_png and Path(curve_png).is_file() else ""
    notes_html = "".join(f"<p class=m>{html.escape(n)}</p>" for n in notes)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{notes_html}<h2>Metrics</h2>"
            f"{_metric_table(results)}{curve}<h2>Captions</h2><div class=g>{''.join(cards)}</div>"
            f"<script>{_CHECK}</script></body></html>")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
