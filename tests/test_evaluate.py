"""Real-data paths: Karpathy split files, caption metrics against pycocoevalcap's own evaluator and
hand-computed values, ``vlrm caption`` and ``vlrm evaluate`` end to end on images the tests make
(and on the shared Flickr8k sample where the machine has it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.shared_data import FLICKR


def _karpathy(tmp_path: Path, coco: bool = False) -> Path:
    """A Karpathy-layout split file with 6 images of its own (COCO's filepath folders with ``coco``)."""
    images = []
    for i in range(6):
        sub = ("train2014" if i < 3 else "val2014") if coco else ""
        folder = tmp_path / "images" / sub
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 30), ((40 * i) % 256, 100, 200 - 20 * i)).save(folder / f"im{i}.jpg")
        split = ["train", "train", "restval", "val", "test", "test"][i]
        entry = {"filename": f"im{i}.jpg", "imgid": i, "split": split,
                 "sentences": [{"raw": f"A photo of thing {i} .", "tokens": ["a", "photo"]},
                               {"raw": f"Thing number {i} on a table .", "tokens": ["thing"]}]}
        if coco:
            entry |= {"filepath": sub, "cocoid": 1000 + i}
        images.append(entry)
    path = tmp_path / ("dataset_coco.json" if coco else "dataset_flickr8k.json")
    path.write_text(json.dumps({"images": images, "dataset": "coco" if coco else "flickr8k"}))
    return path


def test_karpathy_source_splits_paths_and_references(tmp_path):
    from vlrm.config import from_dict
    from vlrm.data import DatasetError, open_source

    path = _karpathy(tmp_path, coco=True)
    cfg = from_dict({"data": {"source": "karpathy", "root": str(tmp_path)}}).data
    src = open_source(cfg)
    train = src.split("train+restval")
    assert len(train) == 3 and train.column("image_id") == [1000, 1001, 1002]
    assert train.column("path")[2].endswith("images/train2014/im2.jpg")
    images, kept, errors = src.split("test").images([0, 1])
    assert len(images) == 2 and not errors and images[0].size == (44, 30)
    assert src.split("test").column("references", [1]) == [["A photo of thing 5 .", "Thing number 5 on a table ."]]
    with pytest.raises(DatasetError, match="unknown split 'testing'"):
        src.split("testing")
    (tmp_path / "bad.json").write_text('{"pictures": []}')
    bad = from_dict({"data": {"source": "karpathy", "root": str(tmp_path / "bad.json")}}).data
    with pytest.raises(DatasetError, match="not a Karpathy split file"):
        open_source(bad)
    assert path.exists()


def test_coco_caption_scores_equal_pycocoevalcaps_own_evaluator(monkeypatch):
    import pycocoevalcap.eval as ev
    from pycocotools.coco import COCO

    from vlrm.caption_metrics import coco_caption_scores

    refs = {1: ["A man rides a red bike .", "a person on a bicycle", "man cycling down the street"],
            2: ["Two dogs play in the snow .", "dogs running in snow"],
            3: ["A bowl of fruit on a table", "apples and oranges in a bowl"]}
    cands = {1: "a man riding a bike on the street", 2: "two dogs in the snow", 3: "a table"}
    ours = coco_caption_scores(refs, cands)

    class NoSpice:  # COCOEvalCap always runs SPICE, which needs a download; everything else is its own
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(ev, "Spice", NoSpice)
    coco = COCO()
    coco.dataset = {"images": [{"id": k} for k in refs], "annotations": [
        {"id": 10 * k + j, "image_id": k, "caption": r} for k, rs in refs.items() for j, r in enumerate(rs)]}
    coco.createIndex()
    res = coco.loadRes([{"image_id": k, "caption": c} for k, c in cands.items()])
    official = ev.COCOEvalCap(coco, res)
    official.evaluate()
    names = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4", "METEOR": "METEOR",
             "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    for ours_key, theirs in names.items():
        assert ours[ours_key] == pytest.approx(official.eval[theirs], abs=1e-9), ours_key
    assert 0 < ours["CIDEr"] and 0 < ours["BLEU-1"] <= 1


def test_spice_without_its_files_says_what_is_missing():
    from vlrm.caption_metrics import coco_caption_scores, spice_missing

    out = coco_caption_scores({1: ["a cat"]}, {1: "a cat"}, spice=True)
    reason = spice_missing()
    assert ("SPICE" in out) == (reason is None)
    if reason:
        assert out["SPICE_missing"] == reason and "CoreNLP" in reason


def test_clip_scores_by_hand_ties_empty_and_long_captions(tiny_clip_dir):
    from vlrm.caption_metrics import clip_scores, text_statistics
    from vlrm.clip import ClipModel
    from vlrm.metrics import retrieval_recall

    clip = ClipModel(str(tiny_clip_dir))
    images = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    long = "a red circle " * 40  # past CLIP's 77 tokens: scored on the first 77, counted
    caps = ["a red circle", "", long]
    refs = [["a red ball", "red"], ["blue"], ["green things", "a green square"]]
    out = clip_scores(clip, images, caps, refs)
    img, txt = clip.encode_images(images), clip.encode_texts(caps)
    cos = (img * txt).sum(-1)
    want = 2.5 * cos.clamp(min=0)
    torch.testing.assert_close(torch.tensor(out["per_caption"]["CLIPScore"]), want)
    assert out["CLIPScore"] == pytest.approx(float(want.mean()), abs=1e-6) and out["clip_truncated"] == 1
    for i, rs in enumerate(refs):
        best = max(float(clip.encode_texts(rs, count=False)[j] @ txt[i]) for j in range(len(rs)))
        best = max(best, 0.0)
        c = float(want[i])
        h = 2 * c * best / (c + best) if c + best > 0 else 0.0
        assert out["per_caption"]["RefCLIPScore"][i] == pytest.approx(h, abs=1e-5)
    # retrieval ties: identical captions score every image the same, so R@1 is 1/G, not 0 or 1
    tie = retrieval_recall(torch.ones(3, 3), torch.arange(3), ks=(1,))
    assert tie[1] == pytest.approx(1 / 3)
    stats = text_statistics(["a red circle", "", "An image of a red red circle", "a red circle"])
    assert stats["empty_captions"] == 1 and stats["distinct_captions"] == 0.75
    assert stats["vocabulary"] == 6 and stats["bad_phrase_rate"] == 0.25
    assert stats["mean_words"] == pytest.approx((3 + 0 + 7 + 3) / 4)


def test_vlrm_caption_and_evaluate_end_to_end(tmp_path, tiny_captioner_dir, tiny_clip_dir, capsys):
    import launch

    path = _karpathy(tmp_path / "data")
    (tmp_path / "data" / "images" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "caps.jsonl"
    assert launch.main(["caption", "--model", str(tiny_captioner_dir), "--out", str(out), "--max-new-tokens", "6",
                        str(tmp_path / "data" / "images")]) == 0
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(records) == 6 and all(set(r) == {"image", "caption"} for r in records)
    assert "broken.jpg" in capsys.readouterr().err  # skipped and named
    result = tmp_path / "eval.json"
    assert launch.main(["evaluate", "--model", str(tiny_captioner_dir), "--data", str(path), "--split", "test",
                        "--clip", str(tiny_clip_dir), "--max-new-tokens", "6", "--out", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "clip_recall@1" in printed and "CIDEr" in printed
    got = json.loads(result.read_text())["results"][str(tiny_captioner_dir)]
    for key in ("clip_recall@1", "clip_recall@5", "CLIPScore", "RefCLIPScore", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                "mean_words", "vocabulary", "distinct_captions", "repetition_rate"):
        assert key in got, key
    assert got["gallery_size"] == 2 and got["clip"] == str(tiny_clip_dir)
    # captions made elsewhere, matched to the split's images by path
    test_paths = [r["image"] for r in records if r["image"].endswith(("im4.jpg", "im5.jpg"))]
    (tmp_path / "given.jsonl").write_text("".join(json.dumps({"image": p, "caption": "a photo of a thing"}) + "\n"
                                                  for p in test_paths))
    assert launch.main(["evaluate", "--captions", str(tmp_path / "given.jsonl"), "--data", str(path), "--split",
                        "test", "--clip", str(tiny_clip_dir)]) == 0
    assert launch.main(["evaluate", "--data", str(path), "--clip", str(tiny_clip_dir)]) == 2  # no model, no captions


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_real_photos_caption_and_evaluate(tmp_path, tiny_captioner_dir, tiny_clip_dir):
    """The 300 Flickr8k photos (read where they are, never copied): every test photo decodes, the
    captioner captions them and every metric comes out."""
    from vlrm.eval_command import main as evaluate

    out = evaluate(["--model", str(tiny_captioner_dir), "--data", str(FLICKR / "dataset_flickr8k.json"), "--split",
                    "test", "--clip", str(tiny_clip_dir), "--max-new-tokens", "8"])
    got = out["results"][str(tiny_captioner_dir)]
    assert got["images"] == 50 and got["bad_images"] == 0 and got["gallery_size"] == 50
    assert 0 <= got["CIDEr"] and 0 <= got["clip_recall@1"] <= 1


def _instances(tmp_path: Path, objects: dict[str, list[str]]) -> Path:
    """A COCO instances file: each file name with the categories annotated in it."""
    cats = sorted({c for cs in objects.values() for c in cs} | {"dog", "cat"})
    ids = {c: i + 1 for i, c in enumerate(cats)}
    images = [{"id": 1000 + i, "file_name": name} for i, name in enumerate(objects)]
    anns = [{"id": j, "image_id": 1000 + i, "category_id": ids[c]}
            for i, cs in enumerate(objects.values()) for j, c in enumerate(cs)]
    path = tmp_path / "instances_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": i, "name": c} for c, i in ids.items()]}))
    return path


def test_chair_counts_hallucinated_objects_by_hand(tmp_path):
    from vlrm.chair import CocoObjects

    objs = CocoObjects(_instances(tmp_path, {"a.jpg": ["person", "dog"], "b.jpg": ["dining table", "cup"],
                                             "c.jpg": ["hot dog"]}))
    # synonyms, plurals and two-word names: men -> person, puppies -> dog, table -> dining table
    assert objs.mentioned("Two men walk their puppies near a table") == {"person", "dog", "dining table"}
    assert objs.mentioned("a hot dog on a plate") == {"hot dog"}  # not a dog
    caps = ["a man with his dog", "a cat on a table next to a cup", "a hot dog and a cat and a bus"]
    got = objs.chair(caps, ["a.jpg", "/images/b.jpg", 1002])
    # mentions: {person, dog} + {cat, dining table, cup} + {hot dog, cat, bus} = 8; wrong: cat, cat, bus
    assert got == {"CHAIR_i": 3 / 8, "CHAIR_s": 2 / 3, "chair_mentions": 8, "chair_captions": 3}
    with pytest.raises(KeyError, match="z.jpg"):
        objs.chair(["a dog"], ["z.jpg"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoObjects(tmp_path / "bad.json")


def test_vlrm_evaluate_reports_chair_with_coco_annotations(tmp_path, tiny_clip_dir):
    import launch

    path = _karpathy(tmp_path / "data", coco=True)
    inst = _instances(tmp_path, {"im4.jpg": ["person"], "im5.jpg": ["bus"]})
    given = tmp_path / "given.jsonl"
    given.write_text(json.dumps({"row": 0, "caption": "a man and a dog"}) + "\n"
                     + json.dumps({"row": 1, "caption": "a red bus"}) + "\n")
    out = tmp_path / "eval.json"
    assert launch.main(["evaluate", "--captions", str(given), "--data", str(path), "--split", "test", "--clip",
                        str(tiny_clip_dir), "--chair", str(inst), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["results"][str(given)]
    assert got["CHAIR_i"] == 1 / 3 and got["CHAIR_s"] == 1 / 2  # the dog is not in im4.jpg
