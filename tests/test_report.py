"""The HTML report of a run and of ``vlrm evaluate --compare``, opened in a real headless Chromium
(Debian's ``chromium``, which the test command installs): the page loads with no console message,
every image decodes, every caption is shown, and the page fetches nothing from the network."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (make test installs it)")


def _open_in_chromium(page) -> tuple[str, str]:
    out = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                          page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stderr


def _check_page(page, captions) -> str:
    text = page.read_text()
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", text)  # self-contained: no network resource
    dom, log = _open_in_chromium(page)
    console = [l for l in log.splitlines() if "CONSOLE" in l]
    assert not console, console
    n_images = text.count("<img ")
    assert f'data-images="ok {n_images}"' in dom, re.findall(r'data-images="[^"]*"', dom)
    shown = {html.unescape(c) for c in re.findall(r"<span class=\"?caption\"?>(.*?)</span>", dom)}
    missing = [c for c in captions if c not in shown]
    assert not missing, missing
    return dom


def _local_run(tmp_path, world, captioner, clip):
    from actors.local import LocalEngine
    from learner.trainer import run_training
    from vlrm.config import from_dict

    cfg = from_dict({
        "seed": 0, "mode": "local", "output_dir": str(tmp_path / "runs"), "run_name": "report", "total_steps": 2,
        "data": {"root": str(world), "num_train": 64, "num_val": 32, "num_test": 32},
        "policy": {"model_path": str(captioner), "value_head_hidden": 16},
        "rollout": {"images_per_batch": 2, "samples_per_image": 2, "max_new_tokens": 6},
        "reward": {"components": {"clip": {"weight": 1.0, "path": str(clip)}, "bad": {"weight": 1.0},
                                  "repeat": {"weight": 1.0}}},
        "learner": {"checkpoint_every": 0},
        "eval": {"evaluator_path": str(clip), "val_every": 1, "val_subset": 4, "gallery_size": 8, "max_new_tokens": 6}})
    return run_training(cfg, LocalEngine)


@needs_chromium
def test_a_runs_report_in_chromium(tmp_path, tiny_world, tiny_captioner_dir, tiny_clip_dir):
    run = _local_run(tmp_path, tiny_world, tiny_captioner_dir, tiny_clip_dir)
    ev = json.loads((run / "eval.json").read_text())
    captions = [e["caption"] for part in ("before", "after") for e in ev[part]["examples"]]
    assert len(ev["after"]["examples"]) == 8  # the whole 8-image gallery is shown
    dom = _check_page(run / "report.html", captions)
    assert "learning curves" in dom and "clip_recall@1" in dom and "attribute_precision" in dom
    assert dom.count("clip ") >= 16 and "repeat " in dom  # every caption's reward components


@needs_chromium
def test_an_evaluate_comparison_report_in_chromium(tmp_path, tiny_world, tiny_captioner_dir, tiny_clip_dir):
    from vlrm.eval_command import main as evaluate

    out = evaluate(["--model", str(tiny_captioner_dir), "--compare", str(tiny_captioner_dir), "--data",
                    str(tiny_world), "--split", "test", "--clip", str(tiny_clip_dir), "--limit", "6",
                    "--max-new-tokens", "6", "--report", str(tmp_path / "compare.html")])
    captions = [e["caption"] for r in out["results"].values() for e in r["examples"]]
    _check_page(tmp_path / "compare.html", captions)
