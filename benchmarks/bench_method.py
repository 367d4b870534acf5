"""Benchmark of the method's compute, side by side in one run (prints a table).

- learner update (A2CUpdater.step: lag filter, teacher-forced log-probs + values, returns, A2C
  losses, backward, clip, AdamW) vs a bare forward+backward of the same model on the same batch
  (HF ``Blip2ForConditionalGeneration(..., labels=...)`` loss, backward, no optimizer);
- sampling (CaptionPolicy.sample: k samples per image, per-token log-probs) vs a bare
  ``model.generate(do_sample=True, num_return_sequences=k)``;
- vision-tower calls per image when k captions are sampled (must be 1);
- the CLIP reward on the sampled captions: text encoded only up to the batch's longest caption
  (``vlrm/clip_text.py``) vs open_clip's ``encode_text`` over the whole context.

- optionally (``--itm``, ``--ref``) the BLIP2-ITM and reference-LM rewards on the same captions.

Each row also gives samples (captions) per second and, on CUDA, the GPU memory the step needs above
the resident weights; the weights and a per-role total follow the table.

    .venv/bin/python benchmarks/bench_method.py --model models/shapes/captioner --images 16 --k 4

Real sizes on a GPU, random weights (``benchmarks/random_models.py``; no download):

    python benchmarks/random_models.py --out /tmp/real --size real --device cuda
    python benchmarks/bench_method.py --model /tmp/real/captioner --clip /tmp/real/clip --itm /tmp/real/itm --ref \
        --device cuda --dtype bfloat16 --reward-dtype bfloat16 --images 16 --k 4

Images come from ``--data``'s val split, or are rendered from the shapes world when it is absent.
Random-weight captioners mostly sample tokens the offline tokenizer cannot decode; rewards then
score the scenes' full descriptions instead (the table says which).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlrm.config import LearnerConfig, PolicyConfig, from_dict
from vlrm.data import DatasetError, open_split, split_path
from vlrm.policy import CaptionPolicy
from vlrm.schema import RolloutTensors
from learner.update import A2CUpdater


def timed(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Median seconds per call of each of ``fns`` (CUDA work included), one warm-up each, then
    ``repeats`` rounds that call them in turn, so that drift (clocks, caches) hits all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, times in zip(fns, runs):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in runs]


def work_gib(device: torch.device, fn) -> tuple[object, float]:
    """Runs ``fn``; returns its result and the GPU memory (GiB) it needed above what was
    allocated before (its activations, caches and outputs), NaN off CUDA."""
    if device.type != "cuda":
        return fn(), math.nan
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / 2**30


def gib(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def module_gib(module: torch.nn.Module) -> float:
    return gib(list(module.parameters()) + list(module.buffers()))


def bench_images(data: str, n: int) -> tuple[list, list[str]]:
    """``n`` images and their full descriptions: the val split of ``data``, or freshly rendered scenes."""
    from shapes_world.world import full_description, render, sample_scene

    try:
        ds = open_split(split_path(data, "val"))
        images, _, _ = ds.images(list(range(n)))
        return images, ds.column("description", list(range(n)))
    except (DatasetError, KeyError):
        pass
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(n)]
    return [render(sc) for sc in scenes], [full_description(sc) for sc in scenes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/shapes/captioner")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--clip", default="models/shapes/reward_clip")
    p.add_argument("--itm", default=None, help="also time the BLIP2-ITM reward of this model")
    p.add_argument("--ref", action="store_true", help="also time the reference-LM reward (the captioner's own LM)")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="policy dtype")
    p.add_argument("--reward-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--micro-batch-size", type=int, default=0, help="learner.micro_batch_size of the timed update")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    t0 = time.perf_counter()
    policy = CaptionPolicy.from_config(PolicyConfig(model_path=a.model, dtype=a.dtype), device=device)
    load_s = time.perf_counter() - t0
    images, descriptions = bench_images(a.data, a.images)
    pix = policy.preprocess(images)
    model = policy.model
    n = a.images * a.k
    rows = []  # (name, ours s, bare s or None, working GiB)

    # --- sampling
    def ours():
        return policy.sample(pix, a.k, max_new_tokens=a.max_new_tokens, seed=0)

    def bare():
        with torch.no_grad():
            return model.generate(pixel_values=pix, do_sample=True, num_return_sequences=a.k,
                                  max_new_tokens=a.max_new_tokens, min_new_tokens=1)

    # same length for both: a fair comparison needs the same number of decoding steps
    t_ours, t_bare = timed([ours, bare], a.repeats, device)
    policy.vision_calls = 0
    samples, mem = work_gib(device, ours)
    calls_per_image = policy.vision_calls / a.images
    rows.append(("sampling: policy.sample vs bare generate", t_ours, t_bare, mem))

    # --- learner update
    rollout = RolloutTensors(
        image_rows=torch.arange(a.images).repeat_interleave(a.k), tokens=samples.tokens, mask=samples.mask,
        behaviour_logprobs=samples.logprobs, rewards=torch.randn(len(samples)),
        policy_versions=torch.zeros(len(samples), dtype=torch.long))
    updater = A2CUpdater(policy, LearnerConfig(micro_batch_size=a.micro_batch_size), min_new_tokens=1)

    def update():
        policy.version = 0
        updater.step(pix, rollout, 0, pixel_rows=list(range(a.images)))

    q, image_token = model.config.num_query_tokens, model.config.image_token_id
    # HF's forward puts the query features at every image token: a random model may sample one
    text = samples.tokens.masked_fill(samples.tokens == image_token, policy.pad_token_id)
    ids = torch.cat([torch.full((n, q), image_token, device=device),
                     torch.full((n, 1), policy.tokenizer.bos_token_id, device=device), text], dim=1)
    attn = torch.cat([torch.ones(n, q + 1, dtype=torch.long, device=device), samples.mask.long()], dim=1)
    labels = torch.where(attn.bool(), ids, -100)
    labels[:, : q + 1] = -100
    pix_rep = pix.repeat_interleave(a.k, dim=0)

    def bare_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pix_rep, input_ids=ids, attention_mask=attn, labels=labels).loss.backward()

    t_upd, t_fb = timed([update, bare_fwd_bwd], a.repeats, device)
    model.zero_grad(set_to_none=True)
    rows.append(("learner update vs bare forward+backward", t_upd, t_fb, work_gib(device, update)[1]))
    weights = {"policy": module_gib(policy),
               "AdamW state": gib(t for st in updater.optimizer.state.values() for t in st.values()
                                  if torch.is_tensor(t))}

    # --- rewards on the sampled captions (or the scenes' descriptions, see the docstring)
    from rewards.combine import build_reward

    decoded = sum(bool(t) for t in samples.texts) / n
    captions = samples.texts if decoded >= 0.5 else [d for d in descriptions for _ in range(a.k)]
    source = "sampled captions" if decoded >= 0.5 else "scene descriptions"
    reward_images = [images[i] for i in range(a.images) for _ in range(a.k)]
    cfg = from_dict({"reward": {"dtype": a.reward_dtype, "components": {
        "clip": {"weight": 1.0, "path": a.clip}, "itm": {"weight": 1.0 if a.itm else 0.0, "path": a.itm or ""},
        "ref": {"weight": 1.0 if a.ref else 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0}}}}).reward
    t0 = time.perf_counter()
    reward = build_reward(cfg, a.model, device=str(device))
    load_s += time.perf_counter() - t0

    import vlrm.clip as clip_module

    clip = reward.components["clip"]

    def score_clip():
        return clip(reward_images, captions)

    trimmed = clip_module.encode_text  # the module-level function ClipModel calls

    def score_clip_full():
        clip_module.encode_text = lambda model, text: model.encode_text(text, normalize=True)
        try:
            return score_clip()
        finally:
            clip_module.encode_text = trimmed

    t_trim, t_full = timed([score_clip, score_clip_full], a.repeats, device)
    rows.append(("CLIP reward: trimmed text vs full context", t_trim, t_full, work_gib(device, score_clip)[1]))
    for name, comp in reward.components.items():
        if name in ("clip", "itm", "ref"):
            weights[f"{name} reward"] = module_gib(comp.lm if name == "ref" else comp.model)
        if name in ("itm", "ref"):
            fn = (lambda c=comp: c(reward_images, captions))
            (t,) = timed([fn], a.repeats, device)
            rows.append((f"{name.upper()} reward", t, None, work_gib(device, fn)[1]))

    def score_all():
        return reward(images, captions, image_index=[i for i in range(a.images) for _ in range(a.k)])

    (t_all,) = timed([score_all], a.repeats, device)
    rows.append(("all rewards, one call: " + "+".join(reward.components), t_all, None, work_gib(device, score_all)[1]))

    print(f"model={a.model} device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"dtype={a.dtype} reward_dtype={a.reward_dtype} images={a.images} k={a.k} max_new_tokens={a.max_new_tokens} "
          f"threads={a.threads} micro_batch_size={a.micro_batch_size} | models loaded in {load_s:.1f}s | rewards scored {source} "
          f"({sum(len(c.split()) for c in captions) / n:.1f} words per caption)")
    print(f"{'measure':45s} {'ours (s)':>9s} {'bare (s)':>9s} {'ratio':>6s} {'samples/s':>10s} {'work GiB':>9s}")
    for name, ours_t, bare_t, mem in rows:
        bare_s = f"{bare_t:9.3f}" if bare_t is not None else f"{'':9s}"
        ratio = f"{ours_t / bare_t:6.2f}" if bare_t is not None else f"{'':6s}"
        print(f"{name:45s} {ours_t:9.3f} {bare_s} {ratio} {n / ours_t:10.1f} {mem:9.2f}")
    print(f"{'vision-tower calls per image (k=%d)' % a.k:45s} {calls_per_image:9.2f}")
    # GPU memory per role: its resident weights (and optimizer state) + the working memory of its step
    print("weights (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in weights.items()))
    if device.type == "cuda":
        work = {name: mem for name, *_, mem in rows}
        reward_w = sum(v for k, v in weights.items() if k.endswith("reward"))
        print(f"per role (GiB): rollout {weights['policy'] + work['sampling: policy.sample vs bare generate']:.1f}, "
              f"learner {weights['policy'] + weights['AdamW state'] + work['learner update vs bare forward+backward']:.1f}, "
              f"reward {reward_w + work[rows[-1][0]]:.1f}")


if __name__ == "__main__":
    main()
