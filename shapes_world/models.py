"""Configs of the tiny shapes-world BLIP-2 models: the same classes as the production models
(``Blip2ForConditionalGeneration`` with an OPT LM, ``Blip2ForImageTextRetrieval``), only small."""
from __future__ import annotations

from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig, PreTrainedTokenizerBase

NUM_QUERY_TOKENS = 8


PATCH_SIZE = 16


def vision_config(image_size: int = 64, patch_size: int = PATCH_SIZE) -> Blip2VisionConfig:
    # patch 16 (16 tokens): the open_clip ViTs here learn several times faster with it than with 8.
    # initializer_range: Blip2VisionConfig defaults to 1e-10 (weights meant to be loaded), which
    # leaves a from-scratch vision tower constant and untrainable in practice.
    return Blip2VisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=128, intermediate_size=512, initializer_range=0.02,
                             num_hidden_layers=3, num_attention_heads=4)


def qformer_config(vocab_size: int, text_input: bool = False) -> Blip2QFormerConfig:
    # text_input: the ITM model also runs text through the Q-Former (BLIP-2 stage 1).
    return Blip2QFormerConfig(vocab_size=vocab_size, use_qformer_text_input=text_input, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=512, encoder_hidden_size=128, cross_attention_frequency=1,
                              max_position_embeddings=128, pad_token_id=1,
                              # no dropout: tiny models, short training
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def captioner_config(tokenizer: PreTrainedTokenizerBase, image_size: int = 64) -> Blip2Config:
    # head_dim = 128 / 4 = 32: vLLM's CPU attention needs head_dim >= 32.
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=128, ffn_dim=512, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=128,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_layer_norm_before=True, dropout=0.0)
    return Blip2Config(vision_config=vision_config(image_size).to_dict(),
                       qformer_config=qformer_config(len(tokenizer)).to_dict(), text_config=text.to_dict(),
                       num_query_tokens=NUM_QUERY_TOKENS,
                       image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token))


def itm_config(tokenizer: PreTrainedTokenizerBase, image_size: int = 64) -> Blip2Config:
    return Blip2Config(vision_config=vision_config(image_size).to_dict(),
                       qformer_config=qformer_config(len(tokenizer), text_input=True).to_dict(),
                       num_query_tokens=NUM_QUERY_TOKENS, image_text_hidden_size=128)
