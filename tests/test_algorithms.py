"""Hand-computed checks of learner/algorithms.py (pure tensor functions, CPU, milliseconds)."""

import math

import pytest
import torch

from learner.algorithms import (
    a2c_losses,
    baseline_losses,
    kl_penalty,
    lag_filter,
    masked_mean,
    masked_whiten,
    rloo_baseline,
    terminal_rewards_to_tokens,
    token_returns,
    truncated_importance_weights,
    vtrace_targets,
)

T_, F_ = True, False
ninf = float("-inf")


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),
                               torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# ------------------------------------------------------------------ helpers


def test_masked_mean_ignores_padding_even_minus_inf():
    x = torch.tensor([[1.0, 2.0, ninf], [4.0, ninf, 7.0]])
    m = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    close(masked_mean(x, m), 7.0 / 3.0)  # (1 + 2 + 4) / 3 valid tokens
    close(masked_mean(x, m, dim=1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(m)), 0.0)  # empty batch: 0, not NaN


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    m = torch.tensor([[T_, T_, T_, F_]])
    # mean 2, unbiased var ((1)+(0)+(1))/2 = 1
    close(masked_whiten(x, m), [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)


# ------------------------------------------------------------------ returns


def test_terminal_rewards_on_last_valid_token():
    seq = torch.tensor([2.0, -1.0, 5.0])
    m = torch.tensor([[T_, T_, T_], [T_, F_, F_], [F_, F_, F_]])
    close(terminal_rewards_to_tokens(seq, m), [[0, 0, 2.0], [-1.0, 0, 0], [0, 0, 0]])


def test_token_returns_gamma_one_and_padding():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    m = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    # row 0: 1+2+3, 2+3, 3 ; row 1: 4+5, 5, pad (9 ignored)
    close(token_returns(r, m), [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])


def test_token_returns_gamma_half():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    m = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    # row 0: G2=3, G1=2+0.5*3=3.5, G0=1+0.5*3.5=2.75 ; row 1: G1=5, G0=4+2.5=6.5
    close(token_returns(r, m, gamma=0.5), [[2.75, 3.5, 3.0], [6.5, 5.0, 0.0]])


def test_token_returns_skip_holes_in_mask():
    r = torch.tensor([[1.0, 100.0, 2.0]])
    m = torch.tensor([[T_, F_, T_]])
    # the hole is not a step: G0 = 1 + 0.5 * 2
    close(token_returns(r, m, gamma=0.5), [[2.0, 0.0, 2.0]])


def test_terminal_reward_gamma_one_every_token_gets_caption_reward():
    m = torch.tensor([[T_, T_, T_, F_], [T_, T_, F_, F_]])
    g = token_returns(terminal_rewards_to_tokens(torch.tensor([0.7, -0.2]), m), m)
    close(g, [[0.7, 0.7, 0.7, 0.0], [-0.2, -0.2, 0.0, 0.0]])


# ------------------------------------------------------------------ A2C


def _a2c_batch():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, ninf]], requires_grad=True)
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 100.0]], requires_grad=True)
    returns = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[T_, T_, T_], [T_, T_, F_]])
    return logprobs, values, returns, mask


def test_a2c_losses_by_hand():
    lp, v, g, m = _a2c_batch()
    out = a2c_losses(lp, v, g, m, value_coef=0.5)
    # A = G - V = [.5 .5 .5 | 1 0]; sum A*logp = -.5 -1 -1.5 -.5 + 0 = -3.5 over 5 tokens
    close(out.policy_loss, 0.7)
    # (V-G)^2 = .25*3 + 1 + 0 = 1.75 over 5 tokens
    close(out.value_loss, 0.35)
    close(out.loss, 0.7 + 0.5 * 0.35)
    close(out.advantages, [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]])
    close(out.advantage_mean, 0.5)
    # Var(G) over [1,1,1,2,2] = 1.2/4 = 0.3 ; Var(G-V) over [.5,.5,.5,1,0] = 0.5/4 = 0.125
    close(out.explained_variance, 1 - 0.125 / 0.3)
    assert math.isfinite(out.loss.item())
    s = out.stats("a2c/")
    assert set(s) >= {"a2c/loss", "a2c/explained_variance"} and "a2c/advantages" not in s


def test_a2c_entropy_and_importance_weights():
    lp, v, g, m = _a2c_batch()
    ent = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 9.0]])
    out = a2c_losses(lp, v, g, m, value_coef=0.5, entropy=ent, entropy_coef=0.1)
    close(out.entropy, 7.0 / 5.0)
    close(out.loss, 0.875 - 0.1 * 1.4)
    w = torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 1.0]])
    out = a2c_losses(lp, v, g, m, importance_weights=w)
    close(out.policy_loss, 3.0 / 5.0)  # -.5 -.5 -1.5 -.5 + 0 = -3


def test_a2c_gradients_are_separated():
    lp, v, g, m = _a2c_batch()
    a2c_losses(lp, v, g, m, value_coef=0.5).loss.backward()
    # policy part: d/dlogp = -A / 5 ; nothing at padding
    close(lp.grad, [[-0.1, -0.1, -0.1], [-0.2, 0.0, 0.0]])
    # value part only: d/dV = 0.5 * 2 (V - G) / 5 ; no policy term through A
    close(v.grad, [[-0.1, -0.1, -0.1], [-0.2, 0.0, 0.0]])

    lp, v, g, m = _a2c_batch()
    a2c_losses(lp, v, g, m, value_coef=0.0).loss.backward()
    close(v.grad, torch.zeros(2, 3))  # policy loss does not reach the value head

    lp, v, g, m = _a2c_batch()
    lp2 = lp.detach()
    out = a2c_losses(lp2, v, g, m, value_coef=1.0)
    assert out.loss.requires_grad  # through values only
    assert not out.advantages.requires_grad


def test_a2c_normalized_advantages():
    lp, v, g, m = _a2c_batch()
    out = a2c_losses(lp, v, g, m, normalize_advantages=True)
    a = out.advantages
    close(masked_mean(a, m), 0.0, tol=1e-5)
    close(masked_mean(a ** 2, m) * 5 / 4, 1.0, tol=1e-4)  # unbiased variance 1
    assert a[1, 2] == 0


# ------------------------------------------------------------------ RLOO


def test_rloo_k2_and_k3_by_hand():
    close(rloo_baseline(torch.tensor([1.0, 3.0, 5.0, 5.0]), k=2), [-2.0, 2.0, 0.0, 0.0])
    # others' means: (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    close(rloo_baseline(torch.tensor([[1.0, 2.0, 6.0]]), k=3), [[-3.0, -1.5, 4.5]])
    with pytest.raises(ValueError):
        rloo_baseline(torch.tensor([1.0, 2.0]), k=1)
    with pytest.raises(ValueError):
        rloo_baseline(torch.tensor([[1.0, 2.0]]), k=1)


def test_baseline_losses_by_hand():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, ninf]], requires_grad=True)
    m = torch.tensor([[T_, T_], [T_, F_]])
    adv = torch.tensor([2.0, -1.0])
    out = baseline_losses(lp, adv, m)
    # A*logp = -2, -4, +3 -> sum -3 over 3 tokens
    close(out.policy_loss, 1.0)
    close(out.loss, 1.0)
    close(out.value_loss, 0.0)
    assert math.isnan(out.explained_variance.item())
    out.loss.backward()
    close(lp.grad, [[-2.0 / 3, -2.0 / 3], [1.0 / 3, 0.0]])


# ------------------------------------------------------------------ off-policy


def test_truncated_importance_weights_clip():
    lp = torch.tensor([[math.log(0.5), math.log(2.0), 0.0, 5.0]], requires_grad=True)
    mu = torch.zeros(1, 4)
    m = torch.tensor([[T_, T_, T_, F_]])
    w = truncated_importance_weights(lp, mu, m)
    close(w, [[0.5, 1.0, 1.0, 0.0]])
    assert not w.requires_grad
    close(truncated_importance_weights(lp, mu, m, clip=1.5), [[0.5, 1.5, 1.0, 0.0]])


def test_vtrace_on_policy_equals_returns():
    g = torch.Generator().manual_seed(0)
    B, T = 3, 5
    lp = -torch.rand(B, T, generator=g)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    m = torch.tensor([[T_] * 5, [T_, T_, T_, F_, F_], [T_, F_, F_, F_, F_]])
    for gamma in (1.0, 0.9):
        vs, adv = vtrace_targets(lp, lp, r, v, m, gamma=gamma)
        ret = token_returns(r, m, gamma=gamma)
        close(vs, ret, tol=1e-5)
        close(adv, torch.where(m, ret - v, torch.zeros_like(v)), tol=1e-5)


def test_vtrace_off_policy_by_hand():
    # pi/mu = 0.5 at t0, 2.0 at t1; t2 is padding. r = [0, 1], V = [0.5, 0.8], gamma = 1.
    lp = torch.tensor([[math.log(0.5), math.log(2.0), 3.0]])
    mu = torch.zeros(1, 3)
    r = torch.tensor([[0.0, 1.0, 7.0]])
    v = torch.tensor([[0.5, 0.8, 9.0]], requires_grad=True)
    m = torch.tensor([[T_, T_, F_]])
    vs, adv = vtrace_targets(lp, mu, r, v, m)
    # rho = c = [0.5, 1]
    # t1: delta = 1*(1 + 0 - 0.8) = 0.2 ; vs1 = 1.0 ; adv1 = 1*(1 + 0 - 0.8) = 0.2
    # t0: delta = 0.5*(0 + 0.8 - 0.5) = 0.15 ; vs0 = 0.5 + 0.15 + 0.5*0.2 = 0.75
    #     adv0 = 0.5*(0 + 1.0 - 0.5) = 0.25
    close(vs, [[0.75, 1.0, 0.0]])
    close(adv, [[0.25, 0.2, 0.0]])
    assert not vs.requires_grad and not adv.requires_grad
    # plain returns would be [1, 1]: the correction matters
    assert vs[0, 0] != token_returns(r, m)[0, 0]
    # rho_clip = 2 lets t1's ratio through: rho = [.5, 2], c = [.5, 1]
    # t1: delta = 2*0.2 = 0.4, vs1 = 1.2, adv1 = 0.4 ; t0: vs0 = 0.5 + 0.15 + 0.5*0.4 = 0.85,
    #     adv0 = 0.5*(1.2 - 0.5) = 0.35
    vs, adv = vtrace_targets(lp, mu, r, v, m, rho_clip=2.0)
    close(vs, [[0.85, 1.2, 0.0]])
    close(adv, [[0.35, 0.4, 0.0]])


def test_lag_filter():
    keep = lag_filter(torch.tensor([5, 4, 3, 2, 6]), current_version=5, max_policy_lag=2)
    assert keep.tolist() == [True, True, True, False, True]
    assert lag_filter([5, 4], 5, 0).tolist() == [True, False]
    assert int((~lag_filter([1, 1, 9], 9, 3)).sum()) == 2


def test_kl_penalty_k1():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, ninf, ninf]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.25, 0.0, 0.0]])
    m = torch.tensor([[T_, T_, F_], [T_, F_, F_]])
    close(kl_penalty(lp, ref, m), [0.5 - 1.0, -0.75])
