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


def _tiny_blip2(cls_name: str, config_name: str, folder, tokenizer):
    """A tiny randomly initialised BLIP-2 model of the production class, saved as checkpoints are."""
    import transformers

    import shapes_world.models as configs
    from shapes_world.pretrain.blip2_io import save_blip2
    from shapes_world.pretrain.itm import init_query_tokens

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(getattr(configs, config_name)(tokenizer))
    init_query_tokens(model)
    return save_blip2(model, tokenizer, folder)


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory, tokenizer):
    return _tiny_blip2("Blip2ForConditionalGeneration", "captioner_config", tmp_path_factory.mktemp("captioner"), tokenizer)


@pytest.fixture(scope="session")
def tiny_itm_dir(tmp_path_factory, tokenizer):
    return _tiny_blip2("Blip2ForImageTextRetrieval", "itm_config", tmp_path_factory.mktemp("itm"), tokenizer)


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


@pytest.fixture(scope="session")
def tiny_reader_dir(tmp_path_factory, tiny_itm_dir, tiny_world):
    """A cell reader (shapes_world/reader.py) on the tiny ITM's tower, its heads fitted on the tiny
    world's training scenes, saved."""
    from transformers import Blip2ForImageTextRetrieval

    from shapes_world.pretrain.common import load_split
    from shapes_world.reader import fit_reader

    train = load_split(tiny_world / "train.parquet")
    tower = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_itm_dir)).vision_model
    folder = tmp_path_factory.mktemp("reader")
    fit_reader(tower, train.images, train.scenes, readout="flat", steps=300).save(folder)
    return folder
