"""One learner update: scored rollouts in, new policy weights out.

:class:`A2CUpdater` owns the optimizer of a :class:`vlrm.policy.CaptionPolicy` and turns one
batch of scored rollouts (:class:`vlrm.schema.RolloutTensors`) into one optimizer step:

1. **lag filter** -- rollouts sampled more than ``max_policy_lag`` versions ago are dropped and
   counted (``dropped``); a batch with nothing left is skipped (no step, no version bump);
2. **teacher-forced forward** -- ``policy.forward_logprobs`` gives the current log-probs, the
   value head's per-token values and (when ``entropy_coef > 0``) the entropies;
3. **returns** -- the caption reward sits on the caption's last token and is discounted
   backwards with ``gamma`` (:func:`learner.algorithms.token_returns`);
4. **baseline** -- ``"value"``: A2C, advantage = return - value, value head trained with MSE;
   ``"rloo"``: per-caption leave-one-out mean over the other samples of the same image (no
   value loss; the value head is left alone);
5. **off-policy correction** -- ``"none"``; ``"truncated_is"``: per-token weights
   ``min(is_clip, pi/mu)`` on the policy gradient; ``"vtrace"``: V-trace value targets and
   advantages (with the RLOO baseline there is no value function to trace, so V-trace reduces to
   the truncated per-token weights on the policy gradient);
6. **optimizer step** -- backward, grad-norm clip of the policy's and the value head's parameters
   each on its own (``grad_clip``; 0 disables), AdamW step
   (the value head has its own learning rate, ``value_lr``), ``policy.version += 1``.

No I/O happens here: the single-process loop and the Ray learner call the same ``step``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from learner.algorithms import (
    a2c_losses,
    baseline_losses,
    kl_penalty,
    lag_filter,
    masked_mean,
    masked_var,
    rloo_baseline,
    terminal_rewards_to_tokens,
    token_returns,
    truncated_importance_weights,
    vtrace_targets,
)
from vlrm.config import LearnerConfig
from vlrm.images import unique_index
from vlrm.policy import CaptionPolicy, PolicyForward
from vlrm.schema import RolloutTensors

__all__ = ["A2CUpdater", "frozen_reference", "select_rollouts", "group_loo_advantages"]


def frozen_reference(policy_cfg: Any, device: str = "cpu") -> CaptionPolicy:
    """The initial policy, frozen: the reference of the KL penalty (``reward.kl_coef``). Built
    from ``policy.model_path`` as the trained policy was, so it is the policy before any update."""
    reference = CaptionPolicy.from_config(policy_cfg, device=device).eval()
    reference.requires_grad_(False)
    return reference


def _images_of(pixels: Tensor, image_index: Tensor, rows: slice, whole: bool) -> tuple[Tensor, Tensor]:
    """The images a micro-batch's ``rows`` use and their rollouts' index into them: only those
    images go through the vision tower (all of them, as given, when ``whole``)."""
    if whole:
        return pixels, image_index
    used, index = torch.unique(image_index[rows], return_inverse=True)
    return pixels[used.to(pixels.device)], index


def select_rollouts(rt: RolloutTensors, keep: Tensor) -> RolloutTensors:
    """The rows of ``rt`` where ``keep`` ([B] bool) is True, padding trimmed to the longest kept row."""
    keep = keep.to(torch.bool).cpu()
    mask = rt.mask[keep]
    width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
    return RolloutTensors(
        image_rows=rt.image_rows[keep], tokens=rt.tokens[keep][:, :width], mask=mask[:, :width],
        behaviour_logprobs=rt.behaviour_logprobs[keep][:, :width], rewards=rt.rewards[keep],
        policy_versions=rt.policy_versions[keep])


def group_loo_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """Leave-one-out advantages ``r_i - mean_{j != i, same group} r_j`` for arbitrary groups.

    ``rewards`` ``[B]`` float, ``groups`` ``[B]`` long (captions of the same image and policy
    version share a group). A caption alone in its group has no leave-one-out baseline and gets
    ``r_i - mean(all other rewards of the batch)`` instead (0 if the batch has one caption).
    Equals :func:`learner.algorithms.rloo_baseline` when every group has the same size k.
    """
    _, g = torch.unique(groups, return_inverse=True)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    sums = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, g, rewards)
    counts = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, g, torch.ones_like(rewards))
    n = counts[g]
    loo = (sums[g] - rewards) / (n - 1).clamp(min=1)
    b = rewards.numel()
    batch_loo = (rewards.sum() - rewards) / max(b - 1, 1)
    return torch.where(n > 1, rewards - loo, rewards - batch_loo if b > 1 else torch.zeros_like(rewards))


class LossTerms(NamedTuple):
    """What :meth:`A2CUpdater._losses` gives: the scalar ``loss`` (with grad), the loss output
    (its statistics), the importance ``weights`` applied (None: none), V-trace's ``(value_loss,
    vs)`` (None unless V-trace with the value baseline), the raw ratios ``pi/mu`` ``[B, T]`` and
    the share of them clipped."""

    loss: Tensor
    out: Any
    weights: Tensor | None
    vtrace: tuple[Tensor, Tensor] | None
    ratio: Tensor
    clipped_frac: Tensor


class A2CUpdater:
    """Optimizer + one-step update of a :class:`~vlrm.policy.CaptionPolicy` (see the module docstring).

    Args:
        policy: the policy being trained (its ``requires_grad`` parameters are optimised).
        cfg: :class:`~vlrm.config.LearnerConfig` (lr, value_lr, weight_decay, grad_clip, gamma,
            value_coef, entropy_coef, normalize_advantages, baseline, off_policy, is_clip,
            max_policy_lag).
        temperature, min_new_tokens: the sampling settings of the rollouts, so that the
            teacher-forced log-probs are those of the distribution that sampled (importance
            ratios are exactly 1 on-policy).
    """

    def __init__(self, policy: Any, cfg: LearnerConfig, *, temperature: float = 1.0, min_new_tokens: int = 0,
                 group: Any = None, reference: Any = None, kl_coef: float = 0.0):
        if kl_coef > 0 and reference is None:
            raise ValueError("kl_coef > 0 needs a reference policy (frozen_reference)")
        if (cfg.micro_batch_size or group is not None) and cfg.normalize_advantages:
            raise ValueError("learner.normalize_advantages cannot be combined with learner.micro_batch_size or a "
                             "data-parallel learner (whitening needs the whole batch's advantages at once)")
        self.policy = policy
        self.cfg = cfg
        self.group = group  # learner.data_parallel.DataParallelGroup: this rank's share of every batch
        self.reference, self.kl_coef = reference, float(kl_coef)  # KL-to-reference penalty (reward.kl_coef)
        self.temperature = float(temperature)
        self.min_new_tokens = int(min_new_tokens)
        value_ids = {id(p) for p in policy.value_head.parameters()}
        named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        policy_params = [p for p in self.params if id(p) not in value_ids]
        value_params = [p for p in self.params if id(p) in value_ids]
        value_lr = cfg.value_lr if cfg.value_lr is not None else cfg.lr
        groups = []
        if policy_params:
            groups.append({"params": policy_params, "lr": cfg.lr, "name": "policy"})
        if value_params:
            groups.append({"params": value_params, "lr": value_lr, "name": "value"})
        if not groups:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.num_updates = 0
        self.total_dropped = 0
        self.total_consumed = 0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and counters: tensors and plain Python values only, so that
        ``torch.load(..., weights_only=True)`` reads it back."""
        return {"optimizer": self.optimizer.state_dict(), "num_updates": int(self.num_updates),
                "total_dropped": int(self.total_dropped), "total_consumed": int(self.total_consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_updates = int(state.get("num_updates", 0))
        self.total_dropped = int(state.get("total_dropped", 0))
        self.total_consumed = int(state.get("total_consumed", 0))

    # ------------------------------------------------------------------ update

    def step(self, pixel_values: Tensor, rollout: RolloutTensors, current_version: int | None = None, *,
             pixel_rows: Sequence[int] | None = None) -> dict[str, float]:
        """One update from scored rollouts. Returns logging stats (floats).

        Args:
            pixel_values: ``[N, 3, S, S]`` the images of the rollouts, each once.
            rollout: ``B`` scored rollouts (:func:`vlrm.schema.to_tensors`).
            current_version: the learner's policy version for the lag filter; default
                ``policy.version``.
            pixel_rows: the dataset row of each of the ``N`` images; default: the distinct
                ``rollout.image_rows`` in order of first appearance (:func:`vlrm.images.unique_index`).

        Stats: ``loss``, ``policy_loss``, ``value_loss``, ``entropy`` (0 unless computed),
        ``neg_logprob`` (an entropy estimate that is always available), ``grad_norm`` /
        ``value_grad_norm`` (the policy's / the value head's, before clipping; each is clipped
        alone), ``explained_variance``, ``advantage_mean/std``, ``value_mean``,
        ``return_mean``, ``reward_mean`` (after the KL penalty), ``kl_mean`` (the captions' summed
        log-ratio to the reference; 0 without ``kl_coef``), ``is_ratio_mean`` (raw pi/mu), ``is_weight_mean``
        (the weights applied; 1 without correction), ``is_clipped_frac``, ``kept``, ``dropped``,
        ``policy_lag_mean/max`` (of kept rollouts), ``tokens``, ``skipped`` (1 if everything was
        dropped), ``version`` (after the update).
        """
        cfg, policy = self.cfg, self.policy
        version = int(policy.version if current_version is None else current_version)
        b = int(rollout.tokens.shape[0])
        keep = lag_filter(rollout.policy_versions.cpu(), version, cfg.max_policy_lag)
        dropped = int((~keep).sum())
        self.total_dropped += dropped
        if pixel_rows is None:
            pixel_rows, _ = unique_index(rollout.image_rows.reshape(-1).tolist())
        pixel_rows = [int(r) for r in pixel_rows]
        if len(pixel_rows) != int(pixel_values.shape[0]):
            raise ValueError(f"{pixel_values.shape[0]} images but {len(pixel_rows)} pixel_rows")
        base = {"dropped": float(dropped), "kept": float(b - dropped), "rollouts": float(b)}
        if dropped == b:
            return base | {"skipped": 1.0, "version": float(policy.version)}
        rt = select_rollouts(rollout, keep) if dropped else rollout
        self.total_consumed += int(rt.tokens.shape[0])

        # Map each rollout to its image; run the vision tower only on images still in use.
        where = {r: i for i, r in enumerate(pixel_rows)}
        try:
            img_of = torch.tensor([where[int(r)] for r in rt.image_rows.tolist()], dtype=torch.long)
        except KeyError as e:
            raise ValueError(f"rollout image row {e.args[0]} is not among pixel_rows") from None
        used, image_index = torch.unique(img_of, return_inverse=True)
        pixels = pixel_values if used.numel() == pixel_values.shape[0] else pixel_values[used.to(pixel_values.device)]

        dev = policy.device
        tokens, mask = rt.tokens.to(dev), rt.mask.to(dev)
        blp = rt.behaviour_logprobs.to(dev, torch.float32)
        rewards = rt.rewards.to(dev, torch.float32)
        image_index = image_index.to(dev)
        b_kept = int(tokens.shape[0])
        rows_here = self.group.shard(b_kept) if self.group is not None else slice(0, b_kept)
        chunks = self.micro_batches(rows_here.stop, start=rows_here.start)
        whole = len(chunks) == 1 and self.group is None  # one forward over every image
        kl = None
        if self.kl_coef > 0:  # the caption's reward minus beta * its log-ratio to the reference policy
            kl = kl_penalty(blp, self._reference_logprobs(pixels, tokens, mask, image_index, chunks, whole), mask)
            rewards = rewards - self.kl_coef * kl
        # The k-sample baseline needs only the rewards: computed once, over the whole batch.
        rloo_adv = self._rloo(rewards, rt) if cfg.baseline == "rloo" else None

        policy.train()
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = mask.sum().clamp(min=1)
        forwards = []
        for rows in chunks:
            chunk_pixels, chunk_index = _images_of(pixels, image_index, rows, whole)
            fwd = policy.forward_logprobs(chunk_pixels, tokens[rows], mask[rows], chunk_index,
                                          temperature=self.temperature, min_new_tokens=self.min_new_tokens,
                                          compute_entropy=cfg.entropy_coef > 0)
            terms = self._losses(fwd, blp[rows], rewards[rows], mask[rows],
                                 None if rloo_adv is None else rloo_adv[rows])
            # Every loss term is a mean over the micro-batch's tokens: weighted by its share of the
            # batch's tokens, the gradients add up to those of the whole batch's loss.
            (terms.loss * (mask[rows].sum() / n_tokens)).backward()
            forwards.append(PolicyForward(*(t.detach() for t in fwd)))
        if self.group is not None:  # sum the ranks' gradients; statistics from every rank's outputs
            self.group.all_reduce_grads(self.params)
            empty = tokens.new_zeros((0, tokens.shape[1]), dtype=torch.float32)
            local = [torch.cat(ts) for ts in zip(*forwards)] if forwards else [empty] * 3
            with torch.no_grad():
                fwd = PolicyForward(*(self.group.gather_rows(t, b_kept) for t in local))
                terms = self._losses(fwd, blp, rewards, mask, rloo_adv)
        elif len(chunks) > 1:  # the batch's statistics, from the detached outputs of all micro-batches
            with torch.no_grad():
                fwd = PolicyForward(*(torch.cat(ts) for ts in zip(*forwards)))
                terms = self._losses(fwd, blp, rewards, mask, rloo_adv)
        loss, out = terms.loss, terms.out

        max_norm = cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else math.inf
        # Each group (policy, value head) is clipped on its own: under one global norm the value
        # head's large early MSE gradients scaled every policy step down (BENCHMARKS.md, the RL ablations).
        grad_norms = {g["name"]: torch.nn.utils.clip_grad_norm_(g["params"], max_norm) for g in self.optimizer.param_groups}
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        policy.version += 1
        self.num_updates += 1

        stats = out.stats()
        stats["loss"] = float(loss.detach())
        if terms.vtrace is not None:
            value_loss, vs = terms.vtrace
            with torch.no_grad():
                var_t = masked_var(vs, mask)
                ev = 1 - masked_var(vs - fwd.values.detach(), mask) / var_t.clamp(min=1e-12)
            stats.update(value_loss=float(value_loss.detach()), return_mean=float(masked_mean(vs, mask)),
                         value_mean=float(masked_mean(fwd.values.detach(), mask)),
                         explained_variance=float(ev) if float(var_t) > 0 else math.nan)
        if "value" in grad_norms:
            stats["value_grad_norm"] = float(grad_norms["value"])
        lags = (version - rt.policy_versions).float()
        with torch.no_grad():
            stats.update(
                neg_logprob=float(-masked_mean(fwd.logprobs.detach(), mask)),
                grad_norm=float(grad_norms.get("policy", 0.0)),
                reward_mean=float(rewards.mean()),
                kl_mean=float(kl.mean()) if kl is not None else 0.0,
                is_ratio_mean=float(masked_mean(terms.ratio, mask)),
                is_weight_mean=float(masked_mean(terms.weights, mask)) if terms.weights is not None else 1.0,
                is_clipped_frac=float(terms.clipped_frac),
                micro_batches=float(len(chunks)),
                data_parallel_workers=float(self.group.world if self.group is not None else 1),
                policy_lag_mean=float(lags.mean()),
                policy_lag_max=float(lags.max()),
                tokens=float(mask.sum()),
                skipped=0.0,
                version=float(policy.version),
            )
        return base | stats

    def _reference_logprobs(self, pixels: Tensor, tokens: Tensor, mask: Tensor, image_index: Tensor,
                            chunks: list[slice], whole: bool) -> Tensor:
        """``[B, T]`` the reference policy's log-probs of the sampled tokens: in the update's
        micro-batches of this rank's rows (so ``learner.micro_batch_size`` bounds its memory too),
        then gathered from every rank."""
        parts = []
        with torch.no_grad():
            for rows in chunks:
                images, index = _images_of(pixels, image_index, rows, whole)
                parts.append(self.reference.forward_logprobs(images, tokens[rows], mask[rows], index,
                                                             temperature=self.temperature,
                                                             min_new_tokens=self.min_new_tokens,
                                                             compute_entropy=False).logprobs)
        local = torch.cat(parts) if parts else tokens.new_zeros((0, tokens.shape[1]), dtype=torch.float32)
        return self.group.gather_rows(local, int(tokens.shape[0])) if self.group is not None else local

    def micro_batches(self, stop: int, start: int = 0) -> list[slice]:
        """Row slices of rows ``start:stop``, ``learner.micro_batch_size`` captions each (one slice
        when it is 0 or covers them all; none when there are no rows)."""
        size = int(self.cfg.micro_batch_size) or max(stop - start, 1)
        return [slice(i, min(i + size, stop)) for i in range(start, stop, size)]

    def _losses(self, fwd: PolicyForward, blp: Tensor, rewards: Tensor, mask: Tensor,
                rloo_adv: Tensor | None) -> "LossTerms":
        """The loss of ``fwd`` (``[B, T]`` outputs of ``policy.forward_logprobs``) under the
        configured baseline and off-policy correction; ``rloo_adv``: ``[B]`` k-sample advantages."""
        cfg = self.cfg
        logprobs, values = fwd.logprobs, fwd.values
        entropy = fwd.entropy if cfg.entropy_coef > 0 else None
        with torch.no_grad():
            ratio = torch.exp((logprobs - blp).detach().clamp(max=50.0))
            rho = truncated_importance_weights(logprobs, blp, mask, clip=cfg.is_clip)
            # a tolerance, so that on-policy ratios of 1 + rounding error do not count as clipped
            clipped_frac = masked_mean((ratio > cfg.is_clip * (1 + 1e-4)).float(), mask)
        step_rewards = terminal_rewards_to_tokens(rewards, mask)
        vtrace = None
        if cfg.baseline == "value" and cfg.off_policy == "vtrace":
            vs, pg_adv = vtrace_targets(logprobs, blp, step_rewards, values, mask,
                                        gamma=cfg.gamma, rho_clip=cfg.is_clip, c_clip=cfg.is_clip)
            out = baseline_losses(logprobs, pg_adv, mask, entropy=entropy, entropy_coef=cfg.entropy_coef,
                                  normalize_advantages=cfg.normalize_advantages)
            value_loss = masked_mean((values - vs) ** 2, mask)
            vtrace = (value_loss, vs)
            return LossTerms(out.loss + cfg.value_coef * value_loss, out, rho, vtrace, ratio, clipped_frac)
        if cfg.baseline == "value":
            iw = rho if cfg.off_policy == "truncated_is" else None
            out = a2c_losses(logprobs, values, token_returns(step_rewards, mask, cfg.gamma), mask,
                             value_coef=cfg.value_coef, entropy=entropy, entropy_coef=cfg.entropy_coef,
                             normalize_advantages=cfg.normalize_advantages, importance_weights=iw)
            return LossTerms(out.loss, out, iw, None, ratio, clipped_frac)
        # rloo; gamma < 1: the caption's advantage is discounted back from its last token like the return.
        adv = token_returns(terminal_rewards_to_tokens(rloo_adv, mask), mask, cfg.gamma)
        iw = rho if cfg.off_policy in ("truncated_is", "vtrace") else None
        out = baseline_losses(logprobs, adv, mask, entropy=entropy, entropy_coef=cfg.entropy_coef,
                              normalize_advantages=cfg.normalize_advantages, importance_weights=iw)
        return LossTerms(out.loss, out, iw, None, ratio, clipped_frac)

    def _rloo(self, rewards: Tensor, rt: RolloutTensors) -> Tensor:
        """Per-caption leave-one-out advantages; :func:`rloo_baseline` when the batch is the
        sampler's layout (consecutive groups of k captions of one image and version)."""
        keys = torch.stack([rt.image_rows, rt.policy_versions], dim=1).to(rewards.device)
        _, groups = torch.unique(keys, dim=0, return_inverse=True)
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        k = int(counts[0])
        if k >= 2 and bool((counts == k).all()) and counts.numel() == int(groups.max()) + 1:
            return rloo_baseline(rewards, k)
        return group_loo_advantages(rewards, groups)
