"""Random-weight models of the production sizes, written in the layouts our loaders read, so the
real-size code paths can run (and be timed) on a GPU with nothing downloaded.

    python benchmarks/random_models.py --out /tmp/real --size real --device cuda

``--size real``:
- ``captioner``: ``Blip2ForConditionalGeneration`` with the dimensions of
  ``Salesforce/blip2-opt-2.7b`` (ViT-g/14 at 224 px, 39 layers; 32-query Q-Former; OPT-2.7B,
  vocabulary 50,272);
- ``itm``: ``Blip2ForImageTextRetrieval`` with those of ``Salesforce/blip2-itm-vit-g``
  (the same ViT-g, Q-Former with text input, BERT vocabulary 30,523);
- ``clip``: open_clip ``ViT-L-14`` (open_clip's own architecture config), local-dir layout.

``--size small``: a BLIP-2 of OPT-125m's LM dimensions (768 wide, 12 layers, head size 64) with a
6-layer ViT-S/14 at 224 px and a 4-layer Q-Former: a medium-small model that generates at a
realistic vocabulary and head size on a CPU. ``--size tiny`` writes the shapes world's tiny
configurations instead (for tests). Both use the
shapes world's offline word-level tokenizer, since no GPT-2 or BERT vocabulary can be fetched;
the real vocabulary sizes are kept, so embeddings and the LM head cost what they do. Token ids
outside the tokenizer decode to nothing. Weights are random: the models time, they do not caption.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shapes_world.pretrain.blip2_io import save_blip2
from shapes_world.pretrain.clip import CLIP_CONFIGS, save_clip
from shapes_world.pretrain.itm import init_query_tokens
from shapes_world.tokenizer import build_tokenizer

OPT_125M = dict(vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True)
OPT_2_7B = dict(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True)
BERT_VOCAB = 30523  # bert-base-uncased + BLIP-2's [DEC] token


def blip2_configs(size: str, tokenizer):
    """``(captioner_config, itm_config)`` of ``size`` ('real' or 'tiny')."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    from shapes_world.models import captioner_config, itm_config

    if size == "tiny":
        return captioner_config(tokenizer), itm_config(tokenizer)
    if size not in ("real", "small"):
        raise ValueError(f"size must be 'real', 'small' or 'tiny', got {size!r}")
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if size == "small":
        vision = Blip2VisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                                   image_size=224, patch_size=14)
        qformer = Blip2QFormerConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                                     num_attention_heads=6, encoder_hidden_size=384)
        text = OPTConfig(**OPT_125M, **special)
    else:
        vision = Blip2VisionConfig()  # transformers' defaults are ViT-g/14: 1408 wide, 39 layers, 224 px
        qformer = Blip2QFormerConfig()
        text = OPTConfig(**OPT_2_7B, **special)
    captioner = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                            text_config=text.to_dict(), num_query_tokens=32,
                            image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token))
    qformer_itm = Blip2QFormerConfig(vocab_size=BERT_VOCAB, use_qformer_text_input=True, pad_token_id=0,
                                     **{k: getattr(qformer, k) for k in ("hidden_size", "intermediate_size",
                                                                         "num_hidden_layers", "num_attention_heads",
                                                                         "encoder_hidden_size")})
    itm = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer_itm.to_dict(), num_query_tokens=32,
                      image_text_hidden_size=256)
    return captioner, itm


def clip_config(size: str) -> dict:
    import open_clip

    return open_clip.get_model_config("ViT-L-14") if size == "real" else CLIP_CONFIGS["evaluator"]


def write_random_models(out: str | Path, size: str = "real", device: str = "cpu", dtype: str = "bfloat16",
                        seed: int = 0, roles: tuple[str, ...] = ("captioner", "itm", "clip")) -> dict[str, Path]:
    """Write ``roles`` (of ``captioner``, ``itm`` and ``clip``) under ``out``; returns their directories.

    Weights are initialised on ``device`` (fast on a GPU) and saved in ``dtype`` as safetensors
    (CLIP in float16, as ``save_clip`` stores it)."""
    import open_clip
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = Path(out)
    tokenizer = build_tokenizer()
    cap_cfg, itm_cfg = blip2_configs(size, tokenizer)
    paths = {}
    torch.manual_seed(seed)
    for name, cls, cfg in (("captioner", Blip2ForConditionalGeneration, cap_cfg),
                           ("itm", Blip2ForImageTextRetrieval, itm_cfg)):
        if name not in roles:
            continue
        with torch.device(device):
            model = cls(cfg)
        init_query_tokens(model)
        model.to(getattr(torch, dtype))
        paths[name] = save_blip2(model, tokenizer, out / name)
        del model
    if "clip" in roles:
        with torch.device(device):
            clip = open_clip.CLIP(**clip_config("real" if size == "small" else size))
        paths["clip"] = save_clip(clip, clip_config("real" if size == "small" else size), out / "clip",
                                  extra={"random_weights": True})
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=("real", "small", "tiny"), default="real")
    p.add_argument("--device", default="cpu", help="where weights are initialised (cuda is much faster at real size)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    a = p.parse_args()
    t0 = time.perf_counter()
    paths = write_random_models(a.out, a.size, a.device, a.dtype)
    for name, path in paths.items():
        mb = sum(f.stat().st_size for f in path.iterdir()) / 2**20
        print(f"{name:10s} {path}  {mb:,.0f} MiB")
    print(f"written in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
