"""Pure tensor functions for the VLRM objective: returns, A2C, RLOO, off-policy correction.

No model code lives here: every function takes tensors and returns tensors, so the
single-process loop and the distributed learner compute exactly the same thing, and each
piece can be tested against hand-computed numbers.

Shape conventions (used in every docstring):

- ``B``: number of sampled captions in the batch (``N`` images x ``k`` samples each).
- ``T``: number of generated token positions (the longest caption in the batch; shorter
  captions are right-padded).
- ``mask``: ``bool`` tensor ``[B, T]``, ``True`` at generated tokens that count (the EOS token
  included if the caller wants it to be trained), ``False`` at padding. Functions never read the
  values of ``logprobs``/``values``/``rewards`` at padding positions, so padding may hold
  anything (``-inf`` log-probs included).

Reductions: every loss is a mean over *all valid tokens in the batch* (one token, one vote),
not a mean of per-sequence means. Long captions therefore weigh more than short ones; this is
the plain A2C estimator over the token-level MDP, and it is what the paper's "per-token return"
formulation implies. Callers wanting per-sequence weighting can pre-scale the mask weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "A2CLossOutput",
    "a2c_losses",
    "baseline_losses",
    "kl_penalty",
    "lag_filter",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "rloo_baseline",
    "terminal_rewards_to_tokens",
    "token_returns",
    "truncated_importance_weights",
    "vtrace_targets",
]


# --------------------------------------------------------------------------- helpers


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is True.

    Args:
        x: any shape, e.g. ``[B, T]``.
        mask: bool, broadcastable to ``x``.
        dim: reduce over this dim only; ``None`` reduces over everything (a 0-dim tensor).

    Returns:
        ``[]`` if ``dim`` is None, else ``x`` with ``dim`` removed. An empty mask gives 0
        (not NaN), so an all-padding batch contributes a zero loss instead of poisoning the
        optimiser.
    """
    mask = mask.to(torch.bool).expand_as(x)
    # torch.where rather than x * mask: padding may hold -inf log-probs and -inf * 0 = NaN.
    total = torch.where(mask, x, torch.zeros_like(x)).sum() if dim is None else (
        torch.where(mask, x, torch.zeros_like(x)).sum(dim)
    )
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over valid positions (0-dim). Bessel-corrected when ``unbiased`` and
    there are at least two valid entries; 0 when there are fewer."""
    mask = mask.to(torch.bool).expand_as(x)
    mean = masked_mean(x, mask)
    sq = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        # tensor ops instead of `if n > 1` so that no GPU sync is forced
        n = mask.sum().to(sq.dtype)
        sq = torch.where(n > 1, sq * n / (n - 1).clamp(min=1), sq)
    return sq


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to zero mean, unit variance over valid positions.

    Args:
        x: ``[B, T]`` (any shape works).
        mask: bool, broadcastable to ``x``.
        shift_mean: if False, only scale (keeps the sign of the raw values, as in torchtune).
        eps: added to the variance.

    Returns:
        Same shape as ``x``; padding positions are 0.
    """
    mask = mask.to(torch.bool).expand_as(x)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))


# --------------------------------------------------------------------------- returns


def terminal_rewards_to_tokens(seq_rewards: Tensor, mask: Tensor) -> Tensor:
    """Place a sequence-level reward on the last valid token of each sequence.

    VLRM scores the whole caption once, so the per-token reward is 0 everywhere except at the
    final generated token; with gamma = 1 every token's return then equals the caption reward.

    Args:
        seq_rewards: ``[B]`` float.
        mask: ``[B, T]`` bool.

    Returns:
        ``[B, T]`` with ``seq_rewards[b]`` at the last True position of ``mask[b]`` and 0
        elsewhere. A row with no valid token gets all zeros (its reward is dropped: there is no
        action to credit).
    """
    mask = mask.to(torch.bool)
    B, T = mask.shape
    positions = torch.arange(T, device=mask.device).expand(B, T)
    # index of the last True per row; -1 for empty rows
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(B, T, dtype=seq_rewards.dtype, device=seq_rewards.device)
    has_token = last >= 0
    rows = torch.arange(B, device=mask.device)[has_token]
    out[rows, last[has_token]] = seq_rewards[has_token]
    return out


def token_returns(rewards_per_token: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}`` for every generated token.

    Discounting steps over valid tokens only: padding positions are skipped (they are not
    actions), so a mask with holes behaves as if the holes were removed. The episode ends after
    the last valid token (bootstrap 0): a caption is a complete episode.

    Args:
        rewards_per_token: ``[B, T]`` float (values at padding are ignored).
        mask: ``[B, T]`` bool.
        gamma: discount; the paper uses 1.

    Returns:
        ``[B, T]`` returns, 0 at padding. Not differentiable w.r.t. anything useful; callers
        pass detached rewards.
    """
    mask = mask.to(torch.bool)
    r = torch.where(mask, rewards_per_token, torch.zeros_like(rewards_per_token))
    out = torch.zeros_like(r)
    carry = torch.zeros_like(r[:, 0])
    # T is the caption length (<= ~60): a reverse loop is clear and cheap.
    for t in range(r.shape[1] - 1, -1, -1):
        m = mask[:, t]
        carry = torch.where(m, r[:, t] + gamma * carry, carry)
        out[:, t] = torch.where(m, carry, torch.zeros_like(carry))
    return out


# --------------------------------------------------------------------------- losses


class A2CLossOutput(NamedTuple):
    """Result of :func:`a2c_losses` / :func:`baseline_losses`.

    ``loss`` carries the gradient; every other field is detached. Stats are 0-dim tensors
    rather than Python floats so that computing the loss never forces a GPU sync; call
    :meth:`stats` when logging.
    """

    loss: Tensor  # [] total = policy + value_coef * value - entropy_coef * entropy
    policy_loss: Tensor  # []
    value_loss: Tensor  # [] (0 for the value-free baseline)
    entropy: Tensor  # [] masked mean per-token entropy (0 if not given)
    advantages: Tensor  # [B, T] detached, as used in the policy loss (after normalisation)
    advantage_mean: Tensor  # [] raw (pre-normalisation) masked mean
    advantage_std: Tensor  # [] raw masked std
    explained_variance: Tensor  # [] 1 - Var(returns - values)/Var(returns); NaN if undefined
    value_mean: Tensor  # [] (NaN for the value-free baseline)
    return_mean: Tensor  # [] (NaN for the value-free baseline)

    def stats(self, prefix: str = "") -> dict[str, float]:
        """All scalar fields as Python floats (one sync), for logging."""
        return {
            f"{prefix}{k}": float(getattr(self, k).detach())
            for k in self._fields
            if k != "advantages"
        }


def _policy_terms(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Tensor | None,
    importance_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Shared policy-gradient and entropy terms. ``advantages`` must already be detached."""
    w = advantages if importance_weights is None else importance_weights.detach() * advantages
    policy_loss = -masked_mean(w * logprobs, mask)
    ent = masked_mean(entropy, mask) if entropy is not None else logprobs.new_zeros(())
    return policy_loss, ent


def a2c_losses(
    logprobs: Tensor,
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    value_coef: float = 0.5,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    normalize_advantages: bool = False,
    importance_weights: Tensor | None = None,
) -> A2CLossOutput:
    """Advantage actor-critic loss with a per-token value head (the VLRM update).

    ``A_t = G_t - V_t`` (detached), ``policy = -mean(w_t * A_t * log pi(a_t))``,
    ``value = mean((V_t - G_t)^2)``, ``loss = policy + value_coef * value - entropy_coef * H``,
    all means over every valid token in the batch.

    Args:
        logprobs: ``[B, T]`` log pi(a_t | s_t) of the sampled tokens under the current policy
            (with grad).
        values: ``[B, T]`` value-head predictions (with grad).
        returns: ``[B, T]`` targets, e.g. :func:`token_returns` or V-trace ``vs`` (detached by
            this function anyway).
        mask: ``[B, T]`` bool.
        value_coef: weight of the value MSE.
        entropy: optional ``[B, T]`` per-token policy entropy (with grad) for a bonus.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        normalize_advantages: whiten the advantages over the valid tokens of the batch.
        importance_weights: optional ``[B, T]`` off-policy weights (e.g.
            :func:`truncated_importance_weights`); detached here so they only rescale.

    Returns:
        :class:`A2CLossOutput`.
    """
    mask = mask.to(torch.bool)
    returns = returns.detach()
    # Detached: the policy gradient must not flow into the value head through A.
    raw_adv = (returns - values).detach()
    raw_adv = torch.where(mask, raw_adv, torch.zeros_like(raw_adv))
    adv = masked_whiten(raw_adv, mask) if normalize_advantages else raw_adv

    policy_loss, ent = _policy_terms(logprobs, adv, mask, entropy, importance_weights)
    value_loss = masked_mean((values - returns) ** 2, mask)
    loss = policy_loss + value_coef * value_loss - entropy_coef * ent

    with torch.no_grad():
        var_ret = masked_var(returns, mask)
        var_res = masked_var(returns - values, mask)
        ev = torch.where(
            var_ret > 0, 1 - var_res / var_ret.clamp(min=1e-12), torch.full_like(var_ret, math.nan)
        )
        out = A2CLossOutput(
            loss=loss,
            policy_loss=policy_loss.detach(),
            value_loss=value_loss.detach(),
            entropy=ent.detach(),
            advantages=adv,
            advantage_mean=masked_mean(raw_adv, mask),
            advantage_std=masked_var(raw_adv, mask).sqrt(),
            explained_variance=ev,
            value_mean=masked_mean(values.detach(), mask),
            return_mean=masked_mean(returns, mask),
        )
    return out


def rloo_baseline(seq_rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages for k samples per image (RLOO, Ahmadian et al. 2024).

    ``A_i = r_i - mean_{j != i} r_j`` over the other ``k - 1`` captions of the same image, i.e.
    ``k / (k - 1) * (r_i - mean_j r_j)``. The baseline does not depend on ``r_i``, so the
    gradient estimate stays unbiased without a value head.

    Args:
        seq_rewards: ``[N * k]`` (the k samples of image n at rows ``n*k .. n*k + k - 1``, the
            order the sampler produces) or ``[N, k]``.
        k: samples per image, >= 2.

    Returns:
        Advantages with the same shape as ``seq_rewards``.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per image, got k={k}")
    shape = seq_rewards.shape
    r = seq_rewards.reshape(-1, k)
    if r.shape[-1] != k or (seq_rewards.dim() == 2 and shape[1] != k):
        raise ValueError(f"rewards of shape {tuple(shape)} do not group into k={k}")
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (k - 1)
    return (r - others_mean).reshape(shape)


def baseline_losses(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    normalize_advantages: bool = False,
    importance_weights: Tensor | None = None,
) -> A2CLossOutput:
    """Policy-gradient loss with a k-sample baseline and no value head (ablation of A2C).

    ``loss = -mean(w_t * A * log pi(a_t)) - entropy_coef * H``, mean over valid tokens.

    Args:
        logprobs: ``[B, T]`` current-policy log-probs of the sampled tokens (with grad).
        advantages: ``[B]`` per-caption advantages (e.g. :func:`rloo_baseline`; broadcast to
            every token of the caption, matching gamma = 1 with a terminal reward) or ``[B, T]``.
        mask: ``[B, T]`` bool.
        entropy, entropy_coef, normalize_advantages, importance_weights: as in
            :func:`a2c_losses`.

    Returns:
        :class:`A2CLossOutput` with ``value_loss = 0`` and NaN value statistics.
    """
    mask = mask.to(torch.bool)
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logprobs)
    raw_adv = torch.where(mask, adv, torch.zeros_like(adv))
    adv = masked_whiten(raw_adv, mask) if normalize_advantages else raw_adv

    policy_loss, ent = _policy_terms(logprobs, adv, mask, entropy, importance_weights)
    loss = policy_loss - entropy_coef * ent
    with torch.no_grad():
        nan = logprobs.new_full((), math.nan)
        return A2CLossOutput(
            loss=loss,
            policy_loss=policy_loss.detach(),
            value_loss=logprobs.new_zeros(()),
            entropy=ent.detach(),
            advantages=adv,
            advantage_mean=masked_mean(raw_adv, mask),
            advantage_std=masked_var(raw_adv, mask).sqrt(),
            explained_variance=nan,
            value_mean=nan,
            return_mean=nan,
        )


# --------------------------------------------------------------------------- off-policy


def truncated_importance_weights(
    logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, clip: float = 1.0
) -> Tensor:
    """Per-token truncated importance ratios ``min(clip, pi(a_t) / mu(a_t))``.

    Rollouts produced by an older policy ``mu`` are reweighted towards the learner's ``pi``.
    Truncation bounds the variance (and, at clip = 1, never up-weights a token); the bias it
    adds is the price IMPALA also pays. Per-token rather than per-sequence ratios: a product
    over 60 tokens explodes or vanishes.

    Args:
        logprobs: ``[B, T]`` current-policy log-probs.
        behaviour_logprobs: ``[B, T]`` log-probs recorded by the rollout actor at sampling time.
        mask: ``[B, T]`` bool.
        clip: truncation level (``rho_bar``).

    Returns:
        ``[B, T]`` detached weights, 0 at padding.
    """
    mask = mask.to(torch.bool)
    log_ratio = (logprobs - behaviour_logprobs).detach()
    # clamp the log ratio before exp so a huge ratio at padding or a bad token cannot overflow
    w = torch.exp(log_ratio.clamp(max=math.log(clip) if clip > 0 else -math.inf))
    return torch.where(mask, w, torch.zeros_like(w))


def vtrace_targets(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    rewards_per_token: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    rho_clip: float = 1.0,
    c_clip: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """V-trace value targets and policy-gradient advantages (IMPALA, Espeholt et al. 2018).

    With ``rho_t = min(rho_clip, pi/mu)``, ``c_t = min(c_clip, pi/mu)``::

        delta_t = rho_t * (r_t + gamma * V_{t+1} - V_t)
        vs_t    = V_t + delta_t + gamma * c_t * (vs_{t+1} - V_{t+1})
        adv_t   = rho_t * (r_t + gamma * vs_{t+1} - V_t)

    with ``V`` and ``vs`` taken as 0 after the last valid token (a caption is a complete episode,
    no bootstrap). Padding positions are skipped, as in :func:`token_returns`. On-policy
    (``pi == mu``, clips >= 1) ``vs`` equals the plain discounted returns.

    Use ``vs`` as the value target (``returns`` of :func:`a2c_losses`) and ``adv`` as the
    policy-gradient advantage.

    Args:
        logprobs: ``[B, T]`` current-policy log-probs.
        behaviour_logprobs: ``[B, T]`` behaviour-policy log-probs.
        rewards_per_token: ``[B, T]``.
        values: ``[B, T]`` value-head predictions.
        mask: ``[B, T]`` bool.
        gamma, rho_clip, c_clip: discount and truncation levels (``rho_bar``, ``c_bar``).

    Returns:
        ``(vs, pg_advantages)``, both ``[B, T]``, detached, 0 at padding.
    """
    mask = mask.to(torch.bool)
    with torch.no_grad():
        ratio = torch.exp((logprobs - behaviour_logprobs).float())
        rho = ratio.clamp(max=rho_clip).to(values.dtype)
        c = ratio.clamp(max=c_clip).to(values.dtype)
        v = values.detach()
        r = rewards_per_token.detach()

        vs = torch.zeros_like(v)
        adv = torch.zeros_like(v)
        zero = torch.zeros_like(v[:, 0])
        next_v, next_vs, acc = zero, zero, zero  # bootstrap 0 after the last valid token
        for t in range(v.shape[1] - 1, -1, -1):
            m = mask[:, t]
            delta = rho[:, t] * (r[:, t] + gamma * next_v - v[:, t])
            acc_t = delta + gamma * c[:, t] * acc  # acc_t = vs_t - V_t
            vs_t = v[:, t] + acc_t
            adv_t = rho[:, t] * (r[:, t] + gamma * next_vs - v[:, t])
            vs[:, t] = torch.where(m, vs_t, zero)
            adv[:, t] = torch.where(m, adv_t, zero)
            # padding leaves the recursion state untouched
            acc = torch.where(m, acc_t, acc)
            next_v = torch.where(m, v[:, t], next_v)
            next_vs = torch.where(m, vs_t, next_vs)
    return vs, adv


def lag_filter(
    policy_versions: Tensor | Sequence[int], current_version: int, max_policy_lag: int
) -> Tensor:
    """Which rollouts are fresh enough to learn from.

    Args:
        policy_versions: ``[B]`` the policy version each rollout was sampled with.
        current_version: the learner's current version.
        max_policy_lag: keep rollouts with ``current_version - version <= max_policy_lag``
            (0 = strictly on-policy). A version newer than the learner's (negative lag) is kept.

    Returns:
        ``[B]`` bool keep-mask; ``(~keep).sum()`` is the number dropped, for the logs.
    """
    versions = torch.as_tensor(policy_versions, dtype=torch.long)
    return (current_version - versions) <= max_policy_lag


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL(pi || ref) estimate: sum over valid tokens of ``logp - ref_logp``.

    This is the k1 estimator (Schulman, "Approximating KL divergence"): unbiased for the
    sequence KL when the tokens were sampled from pi, but noisy and negative for some samples.
    Subtract ``beta * kl_penalty(...)`` from the caption reward as the alternative to the
    reference-LM term. Not detached: pass sampling-time (no-grad) log-probs when using it as a
    reward.

    Args:
        logprobs: ``[B, T]`` policy log-probs of the sampled tokens.
        ref_logprobs: ``[B, T]`` reference-model log-probs of the same tokens.
        mask: ``[B, T]`` bool.

    Returns:
        ``[B]`` summed log-ratio per caption.
    """
    mask = mask.to(torch.bool)
    diff = logprobs - ref_logprobs
    return torch.where(mask, diff, torch.zeros_like(diff)).sum(dim=1)
