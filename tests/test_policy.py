"""CaptionPolicy and ValueHead on a tiny random BLIP-2 captioner (same classes as production)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlrm.config import PolicyConfig
from vlrm.policy import CaptionPolicy, Samples
from vlrm.value_head import ValueHead

EOS_BOOST = 3.0


def _policy(path, **kw) -> CaptionPolicy:
    return CaptionPolicy.from_config(PolicyConfig(model_path=str(path), **kw))


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


@torch.no_grad()
def _perturb(policy: CaptionPolicy, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor (LoRA B included, which starts at 0) away from its init."""
    g = torch.Generator().manual_seed(seed)
    for p in policy.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def _boost_eos(policy: CaptionPolicy):
    """Make the random LM end captions often (a hook on lm_head, seen by sampling and scoring alike)."""
    eos = policy.eos_token_id

    def hook(module, inputs, output):
        output = output.clone()
        output[..., eos] += EOS_BOOST
        return output

    return policy.lm.get_output_embeddings().register_forward_hook(hook)


@torch.no_grad()
def _plain_logprobs(model, policy: CaptionPolicy, pixels, samples: Samples):
    """Teacher-forced token log-probs of ``samples`` under a plain ``Blip2ForConditionalGeneration``."""
    b = samples.tokens.shape[0]
    prompt = torch.full((b, policy.num_query_tokens + 1), policy.image_token_id, dtype=torch.long)
    prompt[:, -1] = policy.bos_token_id
    ids = torch.cat([prompt, samples.tokens[:, :-1]], dim=1)
    logits = model(pixel_values=pixels[samples.image_index], input_ids=ids).logits[:, policy.num_query_tokens:]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, samples.tokens[..., None]).squeeze(-1)
    return torch.where(samples.mask, lp, torch.zeros_like(lp))


def _plain_matches(model, sd, pol, pixels, max_new_tokens: int) -> list[str]:
    """Load ``sd`` into a plain BLIP-2 (strict=False, as the released model card does): its greedy
    captions and its log-probs of sampled captions are the policy's. Returns the captions."""
    assert not model.load_state_dict(sd, strict=False).unexpected_keys
    out = model.generate(pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    caps = [c.strip() for c in pol.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert caps == pol.caption(pixels, max_new_tokens=max_new_tokens)
    s = pol.sample(pixels, 2, max_new_tokens=6, min_new_tokens=0, seed=0)
    torch.testing.assert_close(_plain_logprobs(model, pol, pixels, s), s.logprobs, atol=1e-4, rtol=0)
    return caps


@pytest.fixture(scope="module")
def pixels(tiny_captioner_dir):
    pol = _policy(tiny_captioner_dir)
    return pol.preprocess(_images(2))


# --------------------------------------------------------------------------- value head


def test_value_head_shapes_and_query():
    torch.manual_seed(0)
    vh = ValueHead(16, hidden=8)
    assert vh(torch.randn(3, 5, 16)).shape == (3, 5)
    vq = ValueHead(16, hidden=8, use_query=True, query_dim=12)
    h, q = torch.randn(3, 5, 16), torch.randn(3, 12)
    v = vq(h, q)
    assert v.shape == (3, 5) and v.dtype == torch.float32
    q2 = q.clone()
    q2[0] += 1.0
    v2 = vq(h, q2)
    assert not torch.allclose(v[0], v2[0]) and torch.allclose(v[1:], v2[1:])  # the image matters, per sample
    with pytest.raises(ValueError):
        vq(h)
    hd = torch.randn(2, 3, 16, requires_grad=True)
    ValueHead(16, hidden=8, detach_input=True)(hd).sum().backward()
    assert hd.grad is None


# --------------------------------------------------------------------------- freezing


def test_freezing_defaults(tiny_captioner_dir):
    pol = _policy(tiny_captioner_dir)
    names = pol.trainable_parameter_names()
    assert names and pol.num_trainable_parameters() == sum(p.numel() for p in pol.parameters() if p.requires_grad)
    for n, p in pol.named_parameters():
        if n.startswith("model.vision_model."):
            assert not p.requires_grad, n
        elif n.startswith("model.language_model."):
            assert p.requires_grad == ("lora_" in n), n
        else:  # qformer, query tokens, projection, value head
            assert p.requires_grad, n
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert "model.query_tokens" in names and any(n.startswith("value_head.") for n in names)
    assert any(n.startswith("model.qformer.") for n in names)
    assert any(n.startswith("model.language_projection.") for n in names)


def test_freezing_options(tiny_captioner_dir):
    pol = _policy(tiny_captioner_dir, lora_r=0, train_qformer=False, train_vision=True)
    for n, p in pol.named_parameters():
        if n.startswith("model.language_model."):
            assert not p.requires_grad, n
        if n.startswith("model.qformer."):
            assert not p.requires_grad, n
        if n.startswith("model.vision_model."):
            assert p.requires_grad, n
    assert not any("lora_" in n for n, _ in pol.named_parameters())


# --------------------------------------------------------------------------- sampling


def test_sample_shapes_mask_eos_and_vision_calls(tiny_captioner_dir, pixels):
    pol = _policy(tiny_captioner_dir)
    handle = _boost_eos(pol)
    try:
        pol.version = 7
        s = pol.sample(pixels, 4, max_new_tokens=10, min_new_tokens=2, seed=0)
    finally:
        handle.remove()
    assert isinstance(s, Samples) and len(s) == 8 and s.k == 4 and s.version == 7
    assert pol.vision_calls == 2  # once per image, not per sample
    b, t = s.tokens.shape
    assert b == 8 and t <= 10
    assert s.mask.shape == s.logprobs.shape == (8, t) and s.mask.dtype == torch.bool
    assert s.image_index.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(s.texts) == 8
    eos, pad = pol.eos_token_id, pol.pad_token_id
    assert (s.lengths >= 2).all()
    assert not (s.tokens[:, :2] == eos).any()  # min_new_tokens
    ended = 0
    for i in range(b):
        n = int(s.lengths[i])
        assert s.mask[i, :n].all() and not s.mask[i, n:].any()  # a prefix
        assert (s.tokens[i, n:] == pad).all() and (s.logprobs[i, n:] == 0).all()
        assert (s.logprobs[i, :n] < 0).all() and torch.isfinite(s.logprobs[i, :n]).all()
        body = s.tokens[i, :n]
        if (body == eos).any():
            ended += 1
            assert body[-1] == eos and not (body[:-1] == eos).any()  # the EOS is the last counted token
        else:
            assert n == 10
    assert ended >= 1
    # reproducible with a seed, and the global RNG is left alone
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    handle = _boost_eos(pol)
    try:
        again = pol.sample(pixels, 4, max_new_tokens=10, min_new_tokens=2, seed=0)
    finally:
        handle.remove()
    assert torch.equal(torch.rand(1), expected)
    assert torch.equal(again.tokens, s.tokens) and again.texts == s.texts


def test_logprobs_match_forward(tiny_captioner_dir, pixels):
    pol = _policy(tiny_captioner_dir)
    _perturb(pol)
    handle = _boost_eos(pol)
    try:
        for temperature, min_new in ((1.0, 0), (1.0, 2), (0.7, 1)):
            s = pol.sample(pixels, 3, max_new_tokens=8, min_new_tokens=min_new, temperature=temperature, seed=1)
            f = pol.forward_logprobs(pixels, s.tokens, s.mask, s.image_index, temperature=temperature,
                                     min_new_tokens=min_new)
            assert f.logprobs.shape == f.values.shape == f.entropy.shape == s.tokens.shape
            torch.testing.assert_close(f.logprobs.detach(), s.logprobs, atol=1e-4, rtol=0)
            assert (f.values[~s.mask] == 0).all() and (f.entropy[~s.mask] == 0).all()
            assert (f.entropy[s.mask] > 0).all()
        # image_index=None: k consecutive captions per image
        f2 = pol.forward_logprobs(pixels, s.tokens, s.mask, temperature=0.7, min_new_tokens=1)
        torch.testing.assert_close(f2.logprobs, f.logprobs)
    finally:
        handle.remove()


def test_caption_greedy_and_beam(tiny_captioner_dir, pixels):
    pol = _policy(tiny_captioner_dir)
    g = pol.caption(pixels, max_new_tokens=6)
    assert len(g) == 2 and all(isinstance(c, str) for c in g)
    assert pol.caption(pixels, max_new_tokens=6) == g
    b = pol.caption(pixels, decoding="beam", num_beams=3, no_repeat_ngram_size=2, max_new_tokens=6)
    assert len(b) == 2
    for c in b:  # no repeated bigram
        w = c.split()
        bigrams = list(zip(w, w[1:]))
        assert len(bigrams) == len(set(bigrams))
    with pytest.raises(ValueError):
        pol.caption(pixels, decoding="nucleus")


# --------------------------------------------------------------------------- learning


def test_gradients_reach_trainable_parts_only(tiny_captioner_dir, pixels):
    pol = _policy(tiny_captioner_dir, value_head_use_query=True)
    pol.train()
    s = pol.sample(pixels, 2, max_new_tokens=5, seed=0)
    calls = pol.vision_calls
    f = pol.forward_logprobs(pixels, s.tokens, s.mask, s.image_index)
    assert pol.vision_calls == calls + 2
    loss = -(f.logprobs * torch.randn_like(f.logprobs)).sum() + (f.values - 1.0).pow(2).sum() - f.entropy.sum()
    loss.backward()
    grads = {n: p.grad for n, p in pol.named_parameters()}
    for n, g in grads.items():
        if n.startswith("model.vision_model.") or (n.startswith("model.language_model.") and "lora_" not in n):
            assert g is None, n
    for part in ("model.qformer.", "model.query_tokens", "model.language_projection.", "lora_B", "value_head."):
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if part in n), part
    assert not pol.model.training  # dropout stays off while the policy trains


# --------------------------------------------------------------------------- weights


def test_trainable_state_dict_round_trip(tiny_captioner_dir, pixels):
    a = _policy(tiny_captioner_dir)
    _perturb(a, seed=3)
    sd = a.trainable_state_dict()
    assert set(sd) == set(a.trainable_parameter_names())
    assert all(v.device.type == "cpu" for v in sd.values())
    b = _policy(tiny_captioner_dir)
    s = a.sample(pixels, 2, max_new_tokens=6, seed=0)
    fa = a.forward_logprobs(pixels, s.tokens, s.mask)
    fb0 = b.forward_logprobs(pixels, s.tokens, s.mask)
    assert not torch.equal(fa.logprobs, fb0.logprobs)
    b.load_trainable_state_dict(sd)
    fb = b.forward_logprobs(pixels, s.tokens, s.mask)
    for x, y in zip(fa, fb):
        assert torch.equal(x, y)
    assert b.caption(pixels, max_new_tokens=6) == a.caption(pixels, max_new_tokens=6)
    assert torch.equal(b.sample(pixels, 2, max_new_tokens=6, seed=0).tokens, s.tokens)
    with pytest.raises(KeyError):
        b.load_trainable_state_dict({"model.vision_model.nope": torch.zeros(1)})
    with pytest.raises(KeyError):
        b.load_trainable_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_checkpoint_save_load(tiny_captioner_dir, pixels, tmp_path):
    a = _policy(tiny_captioner_dir, value_head_use_query=True)
    _perturb(a, seed=4)
    a.version = 11
    a.save_checkpoint(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "trainable.safetensors").is_file()
    assert (tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "value_head.safetensors").is_file()
    b = _policy(tiny_captioner_dir, value_head_use_query=True)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.version == 11
    s = a.sample(pixels, 2, max_new_tokens=6, seed=0)
    for x, y in zip(a.forward_logprobs(pixels, s.tokens, s.mask), b.forward_logprobs(pixels, s.tokens, s.mask)):
        assert torch.equal(x, y)
    c = _policy(tiny_captioner_dir, lora_r=0, value_head_use_query=True)
    with pytest.raises(ValueError):
        c.load_checkpoint(tmp_path / "ckpt")


def test_released_style_weights_load_into_plain_blip2(tiny_captioner_dir, pixels, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    pol = _policy(tiny_captioner_dir, lora_r=0)  # LM untouched: the released VLRM setting
    _perturb(pol, seed=5)
    pol.save_checkpoint(tmp_path)
    sd = load_file(str(tmp_path / "trainable.safetensors"))
    assert "query_tokens" in sd
    assert all(k == "query_tokens" or k.startswith(("qformer.", "language_projection.")) for k in sd)
    plain = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).eval()
    plain_caps = _plain_matches(plain, sd, pol, pixels, 6)
    # ...and a single released-style file loads back into a policy
    fresh = _policy(tiny_captioner_dir, lora_r=0)
    fresh.load_checkpoint(tmp_path / "trainable.safetensors")
    assert fresh.caption(pixels, max_new_tokens=6) == plain_caps


def test_export_pretrained_gives_same_greedy_captions(tiny_captioner_dir, pixels, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    pol = _policy(tiny_captioner_dir)
    _perturb(pol, seed=6, scale=0.1)
    with pol._peft.disable_adapter():
        without_lora = pol.caption(pixels, max_new_tokens=8)
    assert without_lora != pol.caption(pixels, max_new_tokens=8)  # the LoRA weights matter here
    pol.export_pretrained(tmp_path / "hf")
    assert any("lora_" in n for n, _ in pol.named_parameters())  # the live policy keeps its adapters
    model = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    proc = Blip2Processor.from_pretrained(str(tmp_path / "hf"))
    assert not any("lora" in n for n in model.state_dict())
    pv = proc.image_processor(images=_images(2), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pv, pixels)
    out = model.generate(pixel_values=pv, max_new_tokens=8, do_sample=False, num_beams=1)
    caps = [c.strip() for c in proc.tokenizer.batch_decode(out, skip_special_tokens=True)]
    assert caps == pol.caption(pixels, max_new_tokens=8)
    s = pol.sample(pixels, 2, max_new_tokens=6, min_new_tokens=0, seed=0)
    torch.testing.assert_close(_plain_logprobs(model, pol, pv, s), s.logprobs, atol=1e-4, rtol=0)


def test_reference_lm_uses_frozen_base(tiny_captioner_dir):
    from transformers import Blip2ForConditionalGeneration

    pol = _policy(tiny_captioner_dir)
    _perturb(pol, seed=7, scale=0.3)
    caps = ["a red circle", "two blue squares on the left", ""]
    ref = pol.reference_lm_logprobs(caps)
    assert ref.shape == (3,) and ref[2] == 0.0
    base = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).language_model.eval()
    tok = pol.tokenizer
    for i, c in enumerate(caps[:2]):
        ids = torch.tensor([[pol.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
        expect = lp.gather(-1, ids[0, 1:, None]).mean()
        torch.testing.assert_close(ref[i], expect, atol=1e-5, rtol=0)
    # the adapters are back on afterwards
    with torch.no_grad():
        ids = torch.tensor([[pol.bos_token_id, 5, 6]])
        assert not torch.allclose(pol.lm(input_ids=ids).logits, base(input_ids=ids).logits)
    assert pol.reference_lm_logprobs(caps[:2], include_eos=True).shape == (2,)


def test_hf_state_dict_merges_lora_for_an_engine_holding_the_plain_model(tiny_captioner_dir, pixels):
    """What a backend with ``weights_format = "hf"`` receives: plain BLIP-2 names, LoRA merged into
    the projections it adapts; loaded into the base model it captions and scores as the policy."""
    from transformers import Blip2ForConditionalGeneration

    pol = _policy(tiny_captioner_dir)
    with torch.no_grad():
        _perturb(pol, seed=3, scale=0.2)
    sd = pol.hf_state_dict()
    assert not any("lora" in k or "base_layer" in k or "value_head" in k for k in sd)
    model = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).eval()
    plain = model.state_dict()
    q = next(k for k in sd if k.endswith("self_attn.q_proj.weight"))
    assert sd[q].shape == plain[q].shape and not torch.equal(sd[q], plain[q])  # the merged delta is there
    _plain_matches(model, sd, pol, pixels, 8)
