"""Shared fixtures: tiny randomly initialised models of the production classes, saved to disk
the way real checkpoints are, so loaders are tested through their real code paths."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    from shapes_world.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory, tokenizer):
    from transformers import Blip2ForConditionalGeneration

    from shapes_world.models import captioner_config
    from shapes_world.pretrain.blip2_io import save_blip2
    from shapes_world.pretrain.itm import init_query_tokens

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(captioner_config(tokenizer))
    init_query_tokens(model)
    return save_blip2(model, tokenizer, tmp_path_factory.mktemp("captioner"))


@pytest.fixture(scope="session")
def tiny_itm_dir(tmp_path_factory, tokenizer):
    from transformers import Blip2ForImageTextRetrieval

    from shapes_world.models import itm_config
    from shapes_world.pretrain.blip2_io import save_blip2
    from shapes_world.pretrain.itm import init_query_tokens

    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(itm_config(tokenizer))
    init_query_tokens(model)
    return save_blip2(model, tokenizer, tmp_path_factory.mktemp("itm"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from shapes_world.pretrain.clip import CLIP_CONFIGS, build_clip, save_clip

    torch.manual_seed(0)
    cfg = CLIP_CONFIGS["evaluator"]
    return save_clip(build_clip(cfg), cfg, tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small shapes world on disk (train 64, val 32, test 32 scenes)."""
    from shapes_world.dataset import write_world

    root = tmp_path_factory.mktemp("shapes")
    write_world(root, seed=0, sizes={"train": 64, "val": 32, "test": 32})
    return root
