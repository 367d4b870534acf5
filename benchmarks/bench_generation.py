"""Generation throughput of the rollout backends side by side: transformers (``hf``) and vLLM
(``vllm``), on the same captioner, images, samples per image and decoding settings, in one run;
and what a weight push costs each (bytes on the wire, seconds to load into the generator).

    python benchmarks/bench_generation.py --model models/shapes/captioner --model /tmp/small/captioner

The hf side runs in this process; the vllm side runs this script again in the vLLM environment
(``--vllm-python``, default ``.venv-vllm/bin/python``, built by ``make vllm-env``) and reports back
as JSON, so both are timed on the same machine in the same invocation. Random-weight models
(``benchmarks/random_models.py --size small|real``) sample to ``--max-new-tokens`` almost always,
so tokens/s compares like with like; the trained shapes captioner stops at its own EOS.

On a GPU (``--device cuda``) the same command times the real BLIP-2 OPT-2.7B size:

    python benchmarks/random_models.py --out /tmp/real --size real --device cuda --dtype bfloat16
    python benchmarks/bench_generation.py --model /tmp/real/captioner --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cfg(a: argparse.Namespace, model: str):
    from vlrm.config import from_dict

    return from_dict({"seed": 0, "policy": {"model_path": model, "dtype": a.dtype},
                      "rollout": {"images_per_batch": a.images, "samples_per_image": a.k, "max_new_tokens": a.max_new_tokens,
                                  "min_new_tokens": 1, "temperature": 1.0,
                                  "vllm": {"gpu_memory_utilization": a.gpu_memory_utilization}}})


def _images(n: int, size: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def measure(backend_name: str, a: argparse.Namespace, model: str, push_file: str) -> dict:
    """Time ``--rounds`` rollout batches after one warm-up, then ``--pushes`` weight loads."""
    import torch

    torch.set_num_threads(a.threads)
    from actors.backends import make_backend

    cfg = _cfg(a, model)
    t0 = time.perf_counter()
    backend = make_backend(cfg, device=a.device, name=backend_name)
    start_s = time.perf_counter() - t0
    size = _image_size(model)
    images = _images(a.images, size)
    backend.generate(images, a.k, seed=0)  # warm-up (kernels, caches, allocator)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    captions = tokens = 0
    sync()
    t0 = time.perf_counter()
    for r in range(a.rounds):
        s = backend.generate(images, a.k, seed=1 + r)
        captions += len(s)
        tokens += int(s.mask.sum())
    sync()
    gen_s = time.perf_counter() - t0
    # a push in the form this backend takes, built by the learner's policy (in the main environment)
    from safetensors.torch import load_file

    state = load_file(push_file.format(fmt=backend.weights_format), device=a.device)
    load = []
    for v in range(1, a.pushes + 1):
        sync()
        t0 = time.perf_counter()
        backend.load_weights(state, v)
        sync()
        load.append(time.perf_counter() - t0)
    from vlrm.wire import packed_nbytes

    return {"backend": backend_name, "model": model, "start_s": start_s, "captions": captions, "tokens": tokens,
            "seconds": gen_s, "captions_per_s": captions / gen_s, "tokens_per_s": tokens / gen_s,
            "weights_format": backend.weights_format, "push_mib": packed_nbytes(state) / 2**20,
            "push_tensors": len(state), "load_s": sorted(load)[len(load) // 2], "device": a.device,
            "threads": a.threads}


def write_pushes(a: argparse.Namespace, model: str, out: Path) -> str:
    """What the learner publishes, in both forms: the trainable set (``policy``) and the HF-named
    set with LoRA merged (``hf``), perturbed so a load really changes weights; as safetensors files
    ``out/push-{fmt}.safetensors`` (the pattern is returned)."""
    import torch
    from safetensors.torch import save_file

    from vlrm.policy import CaptionPolicy

    policy = CaptionPolicy.from_config(_cfg(a, model).policy, device=a.device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    for fmt, sd in (("hf", policy.hf_state_dict()), ("policy", policy.trainable_state_dict(device=None))):
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(out / f"push-{fmt}.safetensors"))
    return str(out / "push-{fmt}.safetensors")


def real_size_pushes() -> list[dict]:
    """Bytes of both push forms at BLIP-2 OPT-2.7B size (bfloat16), built by the policy's own code
    on PyTorch's meta device (no memory, no weights), for the default LoRA targets and those of
    ``configs/blip2_opt27b.yaml``."""
    from types import SimpleNamespace

    import torch
    from transformers import Blip2ForConditionalGeneration

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_models import blip2_configs
    from shapes_world.tokenizer import build_tokenizer
    from vlrm.config import from_dict
    from vlrm.policy import CaptionPolicy
    from vlrm.wire import packed_nbytes

    tok = build_tokenizer()
    config, _ = blip2_configs("real", tok)
    out = []
    for targets in (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "out_proj"]):
        pcfg = from_dict({"policy": {"dtype": "bfloat16", "lora_target_modules": targets}}).policy
        with torch.device("meta"):
            policy = CaptionPolicy(Blip2ForConditionalGeneration(config).to(torch.bfloat16),
                                   SimpleNamespace(tokenizer=tok), pcfg)
            forms = {"policy": policy.trainable_state_dict(device=None), "hf": policy.hf_state_dict()}
        out.append({"lora": "/".join(t.removesuffix("_proj") for t in targets),
                    **{f"{f}_mib": packed_nbytes(sd) / 2**20 for f, sd in forms.items()}})
    return out


def _image_size(model: str) -> int:
    return int(json.loads((Path(model) / "config.json").read_text())["vision_config"].get("image_size", 224))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", help="captioner directory (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--images", type=int, default=16, help="images per rollout batch")
    p.add_argument("--k", type=int, default=4, help="samples per image")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    p.add_argument("--only", choices=("hf", "vllm"), help="measure one backend here and print JSON (internal)")
    p.add_argument("--push-file", help="(internal) push-{fmt}.safetensors pattern")
    a = p.parse_args()
    models = a.model or [str(ROOT / "models" / "shapes" / "captioner")]
    if a.only:
        print("RESULT " + json.dumps([measure(a.only, a, m, a.push_file) for m in models]), flush=True)
        return
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    rows = []
    for m in models:
        push = write_pushes(a, m, tmp)
        rows.append(measure("hf", a, m, push))
        args = [a.vllm_python, str(Path(__file__).resolve()), "--only", "vllm", "--model", m, "--push-file", push] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
            if k not in ("model", "only", "vllm_python", "push_file") and v is not None]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            sys.exit(f"vllm side failed ({r.returncode}): {r.stderr.strip().splitlines()[-5:]}")
        rows.extend(json.loads(line[-1][len("RESULT "):]))
    print(f"\n{a.images} images x {a.k} samples per batch, up to {a.max_new_tokens} new tokens, {a.rounds} batches "
          f"after a warm-up; {a.device}, {a.dtype}, {a.threads} threads")
    print(f"{'model':34s} {'backend':7s} {'start s':>8s} {'captions/s':>11s} {'tokens/s':>9s} {'vs hf':>6s} "
          f"{'push form':>9s} {'push MiB':>9s} {'load s':>8s}")
    for r in rows:
        hf = next(x for x in rows if x["model"] == r["model"] and x["backend"] == "hf")
        print(f"{Path(r['model']).parent.name + '/' + Path(r['model']).name:34s} {r['backend']:7s} {r['start_s']:8.1f} "
              f"{r['captions_per_s']:11.1f} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / hf['tokens_per_s']:6.2f} "
              f"{r['weights_format']:>9s} {r['push_mib']:9.2f} {r['load_s']:8.3f}")
    print("\npush size at BLIP-2 OPT-2.7B size (bfloat16, LoRA r=8), per step and rollout actor:")
    for r in real_size_pushes():
        print(f"  LoRA on {r['lora']:9s}  policy form (hf backend) {r['policy_mib']:8.1f} MiB   "
              f"hf form, LoRA merged (vllm backend) {r['hf_mib']:8.1f} MiB")


if __name__ == "__main__":
    main()
