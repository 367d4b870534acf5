"""How well one human caption scores against the other humans': the ceiling of the n-gram metrics
on a Karpathy split file (each image's first sentence as the candidate, the rest as references).

    python benchmarks/human_captions.py ../shared/data/flickr8k-karpathy/dataset_flickr8k.json --split all

Prints one table row per split; CLIPScore needs a real CLIP (``--clip ViT-B-32/openai`` where its
weights are in the open_clip cache).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlrm.caption_metrics import clip_scores, coco_caption_scores  # noqa: E402
from vlrm.config import from_dict  # noqa: E402
from vlrm.data import open_source  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("split_file")
    p.add_argument("--split", default="test", help="a split, several joined with '+', or 'all'")
    p.add_argument("--clip", default=None, help="CLIP for CLIPScore / RefCLIPScore (off by default)")
    a = p.parse_args()
    src = open_source(from_dict({"data": {"source": "karpathy", "root": a.split_file}}).data)
    splits = ["train+restval+val+test" if a.split == "all" else a.split]
    keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"] + (["CLIPScore", "RefCLIPScore"] if a.clip else [])
    print(f"machine: {platform.platform()}; command: python benchmarks/human_captions.py {' '.join(sys.argv[1:])}")
    print(f"{'split':<24}{'images':>8}" + "".join(f"{k:>14}" for k in keys) + f"{'seconds':>10}")
    for name in splits:
        t0 = time.perf_counter()
        split = src.split(name)
        refs = split.column("references")
        rows = [i for i, r in enumerate(refs) if len(r) >= 2]
        cand = {i: refs[i][0] for i in rows}
        others = {i: refs[i][1:] for i in rows}
        out = coco_caption_scores(others, cand)
        if a.clip:
            from vlrm.clip import ClipModel

            images, kept, _ = split.images(rows, skip_bad=True)
            out |= clip_scores(ClipModel(a.clip), images, [cand[i] for i in kept], [others[i] for i in kept])
        print(f"{name:<24}{len(rows):>8}" + "".join(f"{out[k]:>14.4f}" for k in keys)
              + f"{time.perf_counter() - t0:>10.1f}")


if __name__ == "__main__":
    main()
