"""Benchmark of the method's compute, side by side in one run (prints a table).

- learner update (A2CUpdater.step: lag filter, teacher-forced log-probs + values, returns, A2C
  losses, backward, clip, AdamW) vs a bare forward+backward of the same model on the same batch
  (HF ``Blip2ForConditionalGeneration(..., labels=...)`` loss, backward, no optimizer);
- sampling (CaptionPolicy.sample: k samples per image, per-token log-probs) vs a bare
  ``model.generate(do_sample=True, num_return_sequences=k)``;
- vision-tower calls per image when k captions are sampled (must be 1);
- the CLIP reward on the sampled captions: text encoded only up to the batch's longest caption
  (``vlrm/clip_text.py``) vs open_clip's ``encode_text`` over the whole context.

    .venv/bin/python benchmarks/bench_method.py --model models/shapes/captioner --images 16 --k 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlrm.config import LearnerConfig, PolicyConfig
from vlrm.data import ImageDataset, split_path
from vlrm.policy import CaptionPolicy
from vlrm.schema import RolloutTensors
from learner.update import A2CUpdater


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    best.sort()
    return best[len(best) // 2]  # median


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/shapes/captioner")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--clip", default="models/shapes/reward_clip")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    policy = CaptionPolicy.from_config(PolicyConfig(model_path=a.model))
    ds = ImageDataset.open(split_path(a.data, "val"))
    images, _, _ = ds.images(list(range(a.images)))
    pix = policy.preprocess(images)
    model = policy.model
    rows = []

    # --- sampling
    def ours():
        return policy.sample(pix, a.k, max_new_tokens=a.max_new_tokens, seed=0)

    def bare():
        with torch.no_grad():
            return model.generate(pixel_values=pix, do_sample=True, num_return_sequences=a.k,
                                  max_new_tokens=a.max_new_tokens, min_new_tokens=1)

    # same length for both: a fair comparison needs the same number of decoding steps
    t_ours, t_bare = timed(ours, a.repeats), timed(bare, a.repeats)
    rows.append(("sampling: policy.sample vs bare generate", t_ours, t_bare))

    policy.vision_calls = 0
    samples = ours()
    calls_per_image = policy.vision_calls / a.images

    # --- learner update
    rollout = RolloutTensors(
        image_rows=torch.arange(a.images).repeat_interleave(a.k), tokens=samples.tokens, mask=samples.mask,
        behaviour_logprobs=samples.logprobs, rewards=torch.randn(len(samples)),
        policy_versions=torch.zeros(len(samples), dtype=torch.long))
    updater = A2CUpdater(policy, LearnerConfig(), min_new_tokens=1)

    def update():
        policy.version = 0
        updater.step(pix, rollout, 0, pixel_rows=list(range(a.images)))

    ids = torch.cat([torch.full((len(samples), model.config.num_query_tokens), model.config.image_token_id),
                     torch.full((len(samples), 1), policy.tokenizer.bos_token_id), samples.tokens], dim=1)
    attn = torch.cat([torch.ones(len(samples), model.config.num_query_tokens + 1, dtype=torch.long),
                      samples.mask.long()], dim=1)
    labels = torch.where(attn.bool(), ids, -100)
    labels[:, : model.config.num_query_tokens + 1] = -100
    pix_rep = pix.repeat_interleave(a.k, dim=0)

    def bare_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pix_rep, input_ids=ids, attention_mask=attn, labels=labels).loss.backward()

    t_upd, t_fb = timed(update, a.repeats), timed(bare_fwd_bwd, a.repeats)
    rows.append(("learner update vs bare forward+backward", t_upd, t_fb))

    # --- CLIP reward on the sampled captions
    import rewards.clip_reward as clip_module

    clip = clip_module.ClipReward(a.clip, batch_size=256)
    captions = samples.texts
    reward_images = [images[i] for i in range(a.images) for _ in range(a.k)]

    def score():
        return clip(reward_images, captions)

    t_trim = timed(score, a.repeats)
    trimmed = clip_module.encode_text  # the module-level function ClipReward calls
    clip_module.encode_text = lambda model, text: model.encode_text(text, normalize=True)
    t_full = timed(score, a.repeats)
    clip_module.encode_text = trimmed
    rows.append(("CLIP reward: trimmed text vs full context", t_trim, t_full))

    print(f"model={a.model} images={a.images} k={a.k} max_new_tokens={a.max_new_tokens} threads={a.threads}")
    print(f"{'measure':45s} {'ours (s)':>9s} {'bare (s)':>9s} {'ratio':>6s}")
    for name, ours_t, bare_t in rows:
        print(f"{name:45s} {ours_t:9.3f} {bare_t:9.3f} {ours_t / bare_t:6.2f}")
    print(f"{'vision-tower calls per image (k=%d)' % a.k:45s} {calls_per_image:9.2f}")


if __name__ == "__main__":
    main()
