"""A word-level tokenizer for the shapes world, built offline with ``tokenizers``.

It follows OPT's conventions (``</s>`` is both BOS and EOS, BOS is prepended, pad id 1) so the
captioner behaves like ``Salesforce/blip2-opt-2.7b``; the BLIP2-ITM Q-Former reads the same ids,
the leading ``</s>`` playing BERT's ``[CLS]`` role.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from shapes_world.world import BACKGROUNDS, COLORS, NUMBER_WORDS, PLURALS, POSITION_SYNONYMS, SHAPES, SIZES

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
IMAGE_TOKEN = "<image>"
# Words of the world's grammar, plus a few ordinary words so that unwanted phrases
# ("an image of", "a photo of", "there is") can be said and penalised.
EXTRA_WORDS = """a an the at in on and with of some single shape shapes object objects thing things
picture background image photo video illustration there is are one middle upper lower
, : ; .""".split()


def vocabulary() -> list[str]:
    words: list[str] = []
    for group in (SHAPES, PLURALS.values(), COLORS, BACKGROUNDS, SIZES, NUMBER_WORDS, EXTRA_WORDS,
                  (w for syns in POSITION_SYNONYMS.values() for s in syns for w in s.split())):
        for w in group:
            if w not in words:
                words.append(w)
    return SPECIALS + words + [IMAGE_TOKEN]


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits punctuation off words
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, tidies " ,"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   padding_side="right", model_max_length=128)
    return fast


def save_tokenizer(out: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(out))
    return tok
