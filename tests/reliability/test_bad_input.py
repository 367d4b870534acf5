"""Bad input, case by case: each gives a clear error naming what was wrong and where, or a counted
skip; never a hang or a lost batch. Every case id here is a row of RELIABILITY.md (a test keeps
the two in step). The cases go through the user's entry points: the ``vlrm`` command, the data
sources, the reward, the weight loaders."""
from __future__ import annotations

import io
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------ images


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _bomb(side: int = 20000) -> bytes:
    """A PNG whose header says side x side pixels: over PIL's decompression-bomb limit."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    return _png(Image.new("RGB", (30, 20), (0, 200, 0)), "JPEG", exif=exif)


_GOOD_PNG = _png(Image.new("RGB", (64, 64), (200, 30, 30)))
DECODED = {  # case id -> (bytes, check on the decoded RGB image)
    "grayscale-image": (_png(Image.new("L", (7, 5), 128)), lambda im: im.getpixel((0, 0)) == (128, 128, 128)),
    "cmyk-image": (_png(Image.new("CMYK", (7, 5), (0, 255, 255, 0)), "JPEG"), lambda im: im.getpixel((3, 2))[0] > 200),
    "rgba-image": (_png(Image.new("RGBA", (7, 5), (255, 0, 0, 0))), lambda im: im.getpixel((0, 0)) == (0, 0, 0)),
    "palette-image": (_png(Image.new("RGB", (7, 5), (0, 0, 255)).convert("P")), lambda im: im.getpixel((1, 1)) == (0, 0, 255)),
    "16-bit-image": (_png(Image.fromarray(np.full((5, 7), 65535, dtype=np.uint16))),
                     lambda im: im.getpixel((0, 0)) == (255, 255, 255)),
    "exif-rotated-image": (_exif_rotated(), lambda im: im.size == (20, 30)),
    "1x1-image": (_png(Image.new("RGB", (1, 1), (9, 9, 9))), lambda im: im.size == (1, 1)),
}
SKIPPED = {  # case id -> bytes of an image file that cannot be decoded
    "corrupt-image": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
    "truncated-image": _GOOD_PNG[: len(_GOOD_PNG) // 2],
    "zero-byte-image": b"",
    "not-an-image": b"name,caption\nthis is a csv file,\n",
    "20000x20000-image": _bomb(),
}


@pytest.mark.parametrize("case", sorted(DECODED))
def test_unusual_images_are_decoded_to_rgb(case, tmp_path):
    from vlrm.data import FolderSplit

    data, check = DECODED[case]
    (tmp_path / f"{case}.png").write_bytes(data)
    images, kept, errors = FolderSplit(tmp_path).images([0], skip_bad=True)
    assert kept == [0] and not errors and images[0].mode == "RGB" and check(images[0])


@pytest.mark.parametrize("case", sorted(SKIPPED))
def test_undecodable_images_are_skipped_counted_and_named(case, tmp_path):
    from vlrm.data import FolderSplit, ImageDecodeError

    (tmp_path / "a-good.png").write_bytes(_GOOD_PNG)
    (tmp_path / f"b-{case}.png").write_bytes(SKIPPED[case])
    split = FolderSplit(tmp_path)
    images, kept, errors = split.images([0, 1], skip_bad=True)
    assert kept == [0] and len(images) == 1 and len(errors) == 1
    assert f"b-{case}.png" in errors[0]  # the file is named
    with pytest.raises(ImageDecodeError, match=re.escape(f"b-{case}.png")):
        split.images([1])


def _world_folder(root: Path, tiny_world: Path, bad: dict[str, bytes]) -> Path:
    """train/val/test folders of shapes-world images, with every bad file in each split."""
    import pyarrow.parquet as pq

    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        d = root / split
        d.mkdir(parents=True)
        table = pq.read_table(tiny_world / f"{split}.parquet", columns=["image"]).slice(0, n)
        for i, data in enumerate(table.column("image").to_pylist()):
            (d / f"{i:03d}.png").write_bytes(data)
        for name, data in bad.items():
            (d / f"zz-{name}.png").write_bytes(data)
    return root


def test_a_training_run_on_a_folder_with_every_bad_kind_completes_and_counts_them(
        tiny_world, tiny_captioner_dir, tiny_clip_dir, tmp_path, capsys):
    """The run trains, evaluates before and after, and reports the bad files it skipped (the
    20000x20000 PNG included: a counted skip, not an error from the evaluation)."""
    import launch

    bad = dict(SKIPPED)
    folder = _world_folder(tmp_path / "photos", tiny_world, bad)
    argv = ["train", "--config", str(ROOT / "configs/shapes.yaml"), "--mode", "local", "--total_steps", "2",
            "--output_dir", str(tmp_path / "runs"), "--run_name", "bad", "--data.source", "folder",
            "--data.root", str(folder), "--policy.model_path", str(tiny_captioner_dir),
            "--reward.components.clip.path", str(tiny_clip_dir), "--eval.evaluator_path", str(tiny_clip_dir),
            "--reward.components.itm.weight", "0", "--eval.val_every", "0", "--eval.gallery_size", "9",
            "--rollout.images_per_batch", "4", "--rollout.samples_per_image", "2", "--rollout.max_new_tokens", "6",
            "--eval.max_new_tokens", "6", "--learner.checkpoint_every", "0", "--policy.value_head_hidden", "16"]
    assert launch.main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr()
    log = out.out + out.err
    for name in bad:
        assert f"zz-{name}.png" in log, name  # each bad file named in the log
    summary = json.loads((tmp_path / "runs" / "bad" / "summary.json").read_text())
    assert summary["bad_images"] > 0 and summary["accounting_holds"]
    ev = json.loads((tmp_path / "runs" / "bad" / "eval.json").read_text())
    assert ev["after"]["bad_images"] == len(bad)  # every bad test image skipped and counted


# ------------------------------------------------------------------------------ files and folders


def test_missing_image_file(tmp_path):
    from vlrm.karpathy import KarpathySource
    from vlrm.config import from_dict

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "present.jpg").write_bytes(_png(Image.new("RGB", (8, 8)), "JPEG"))
    listing = {"images": [{"filename": n, "split": "train", "sentences": [{"raw": "a photo"}]}
                          for n in ("present.jpg", "absent.jpg")]}
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps(listing))
    cfg = from_dict({"data": {"source": "karpathy", "root": str(tmp_path / "dataset_flickr8k.json"),
                              "image_root": str(tmp_path / "img")}}).data
    split = KarpathySource(cfg).split("train")
    images, kept, errors = split.images([0, 1], skip_bad=True)
    assert kept == [0] and len(errors) == 1 and "absent.jpg" in errors[0]


def test_missing_folder(tmp_path, capsys):
    import launch

    assert launch.main(["train", "--data.source", "folder", "--data.root", str(tmp_path / "nowhere"),
                        "--mode", "local", "--output_dir", str(tmp_path / "runs")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_empty_dataset(tmp_path):
    from vlrm.data import DatasetError, FolderSplit

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train"))):
        FolderSplit(tmp_path / "train")


def test_corrupt_parquet_file(tmp_path):
    from vlrm.data import DatasetError, ParquetSplit

    (tmp_path / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "train.parquet"))):
        ParquetSplit(tmp_path / "train.parquet")


def test_missing_karpathy_split(tmp_path):
    from vlrm.config import from_dict
    from vlrm.data import DatasetError
    from vlrm.karpathy import KarpathySource

    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filename": "a.jpg", "split": "train", "sentences": []}]}))
    cfg = from_dict({"data": {"source": "karpathy", "root": str(tmp_path / "dataset_coco.json")}}).data
    with pytest.raises(DatasetError, match="test"):
        KarpathySource(cfg).split("test")


# ------------------------------------------------------------------------------------ config

CONFIG_CASES = {  # case id -> (arguments, what the one-line error must name)
    "unknown-config-key": (["--rollout.num_actor=3"], "did you mean 'rollout.num_actors'"),
    "wrong-type": (["--rollout.num_actors=two"], "rollout.num_actors"),
    "zero-actors": (["--rollout.num_actors=0"], "rollout.num_actors"),
    "negative-actors": (["--reward.num_actors=-1"], "reward.num_actors"),
    "unknown-data-source": (["--data.source=webdataset"], "data.source"),
    "unknown-reward-key": (["--reward.components.clip.weigth=1"], "reward.components.clip.weigth"),
    "bad-yaml-value": (["--learner.lr=fast"], "learner.lr"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_errors_name_the_key_and_exit_2(case, tmp_path, capsys):
    import launch

    args, must = CONFIG_CASES[case]
    assert launch.main(["train", "--output_dir", str(tmp_path)] + args) == 2
    err = capsys.readouterr().err
    assert must in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_impossible_resource_request(tmp_path, capsys):
    """More GPUs than the cluster has: a message naming the key, not a silent wait, and before the
    data is prepared (here: the shapes world is not generated first)."""
    import ray

    import launch

    assert not ray.is_initialized()
    world = tmp_path / "world"
    argv = ["train", "--config", str(ROOT / "configs/shapes.yaml"), "--rollout.num_gpus", "1", "--rollout.num_actors",
            "1", "--reward.num_actors", "1", "--output_dir", str(tmp_path), "--cluster.include_dashboard", "false",
            "--data.root", str(world)]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert "rollout.num_gpus" in err and "1 GPU" in err and "no node" in err
    assert not ray.is_initialized()  # the local cluster it started is shut down again
    assert not world.exists()


# ------------------------------------------------------------------------------------ rewards


class _Const:
    def __init__(self, values):
        self.values = values

    def __call__(self, images, captions):
        return torch.tensor(self.values[: len(captions)], dtype=torch.float32)


@pytest.mark.parametrize("case,value", [("nan-reward", math.nan), ("inf-reward", math.inf)])
def test_non_finite_rewards_name_the_component_and_caption(case, value):
    from rewards.combine import CombinedReward, RewardError

    comb = CombinedReward({"ok": _Const([1.0, 1.0]), "broken": _Const([0.0, value])}, {"ok": 1.0, "broken": 1.0})
    with pytest.raises(RewardError, match=r"'broken'.*caption 1") as e:
        comb([None, None], ["fine", "the second caption"])
    assert e.value.component == "broken" and e.value.index == 1


def test_a_reward_plugin_that_raises(tmp_path):
    from rewards import RewardError, build_reward
    from vlrm.config import from_dict

    (tmp_path / "flaky.py").write_text("def make():\n    def reward(images, captions):\n"
                                       "        raise RuntimeError('model server down')\n    return reward\n")
    cfg = from_dict({"reward": {"components": {"clip": {"weight": 0.0}, "flaky": {
        "target": f"{tmp_path / 'flaky.py'}:make", "weight": 1.0}}}})
    reward = build_reward(cfg.reward, captioner_path="")
    with pytest.raises(RewardError, match=r"'flaky' failed: RuntimeError: model server down") as e:
        reward([Image.new("RGB", (8, 8))], ["a caption"])
    assert e.value.component == "flaky"


@pytest.fixture(scope="module")
def clip_reward(tiny_clip_dir):
    from rewards.clip_reward import ClipReward

    return ClipReward(str(tiny_clip_dir))


def test_empty_captions_are_scored(clip_reward):
    out = clip_reward([Image.new("RGB", (64, 64))] * 2, ["", "a red circle"])
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_captions_over_77_clip_tokens_are_truncated_and_counted(clip_reward):
    long = " ".join(["a large red circle at the top left"] * 20)
    before = clip_reward.truncated
    out = clip_reward([Image.new("RGB", (64, 64))] * 2, [long, "a red circle"])
    assert torch.isfinite(out).all() and clip_reward.truncated == before + 1


# ------------------------------------------------------------------------------------ weights


def _policy(tiny_captioner_dir):
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    return CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), value_head_hidden=16, lora_r=0))


def test_checkpoint_of_the_wrong_shape(tiny_captioner_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"query_tokens": torch.zeros(3, 3)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"query_tokens: \(3, 3\)"):
        _policy(tiny_captioner_dir).load_delta(tmp_path / "wrong.safetensors")


def test_checkpoint_from_another_model(tiny_captioner_dir, tmp_path):
    from safetensors.torch import save_file

    save_file({"text_model.encoder.layer.0.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="text_model.encoder.layer.0.weight"):
        _policy(tiny_captioner_dir).load_delta(tmp_path / "other.safetensors")


def test_truncated_safetensors_file(tiny_captioner_dir, tmp_path):
    from safetensors.torch import save_file

    from vlrm.policy_weights import read_delta

    pol = _policy(tiny_captioner_dir)
    save_file({k: v.contiguous() for k, v in pol.released_state_dict().items()}, tmp_path / "delta.safetensors")
    data = (tmp_path / "delta.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "cut.safetensors"))):
        read_delta(tmp_path / "cut.safetensors")


def test_a_pickle_that_needs_unrestricted_unpickling_is_refused(tmp_path):
    from vlrm.policy_weights import read_delta

    torch.save({"query_tokens": torch.zeros(1), "note": Path("not a tensor")}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_delta(tmp_path / "evil.pt")


def test_resume_from_a_missing_run(tmp_path, capsys):
    import launch

    assert launch.main(["train", "--resume", str(tmp_path / "gone")]) == 2
    assert str(tmp_path / "gone") in capsys.readouterr().err


def test_every_case_is_a_row_of_reliability_md():
    text = (ROOT / "RELIABILITY.md").read_text()
    ids = sorted(DECODED) + sorted(SKIPPED) + sorted(CONFIG_CASES) + [
        "nan-reward", "inf-reward", "reward-plugin-raises", "empty-caption", "caption-over-77-tokens",
        "missing-image-file", "missing-folder", "empty-dataset", "corrupt-parquet", "missing-karpathy-split",
        "impossible-resource-request", "wrong-shape-checkpoint", "checkpoint-from-another-model",
        "truncated-safetensors", "pickle-checkpoint", "resume-missing-run", "folder-run-with-bad-images"]
    missing = [i for i in ids if f"`{i}`" not in text]
    assert not missing, missing
    assert len(ids) >= 30
