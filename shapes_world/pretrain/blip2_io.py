"""Saving the BLIP-2 models in the Hugging Face layout, with a processor, so that loading a
shapes-world model is the same call as loading ``Salesforce/blip2-opt-2.7b``."""
from __future__ import annotations

from pathlib import Path

from transformers import Blip2Processor, BlipImageProcessor, PreTrainedModel, PreTrainedTokenizerBase

from shapes_world.pretrain.common import IMAGE_MEAN, IMAGE_STD


def build_processor(tokenizer: PreTrainedTokenizerBase, image_size: int, num_query_tokens: int) -> Blip2Processor:
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(IMAGE_MEAN),
                                image_std=list(IMAGE_STD), do_convert_rgb=True)
    return Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=num_query_tokens)


def save_blip2(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    cfg = model.config
    build_processor(tokenizer, cfg.vision_config.image_size, cfg.num_query_tokens).save_pretrained(str(out))
    return out
