"""The value head of the A2C learner: one scalar per generated token.

The paper's Figure 2 (the value-head architecture) is unknown to us, so this is the plainest
choice, with its options documented:

- **Input**: the language model's last hidden state (after the final layer norm) at the
  position that *predicts* token ``t``; optionally (``use_query=True``) concatenated with the
  mean-pooled query embeddings (the projected Q-Former output, the image as the LM sees it).
- **MLP**: ``Linear(in, hidden) -> Tanh -> Linear(hidden, 1)``, computed in float32 whatever
  the LM's dtype; the output layer starts small so the first values are close to 0.
- **Meaning**: the value at the position that predicts token ``t`` (the BOS position for
  ``t = 0``) estimates the return of generating ``t`` onwards from the state
  "image + prefix ``t_<t``" -- exactly the quantity the per-token return ``G_t`` of
  ``learner.algorithms.token_returns`` targets, so ``advantage_t = G_t - V_t``.
- **Gradient**: by default the value loss also trains the shared trunk (Q-Former, LoRA) as in
  a shared actor-critic; ``detach_input=True`` makes the head read detached features, so only
  the head learns from the value loss.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ValueHead"]


class ValueHead(nn.Module):
    """``[B, T, H_lm]`` hidden states (+ optional ``[B, H_q]`` pooled query) -> ``[B, T]`` values.

    Args:
        lm_hidden: width ``H_lm`` of the LM's last hidden state.
        hidden: width of the MLP's hidden layer.
        use_query: also read the mean-pooled query embeddings (width ``query_dim``).
        query_dim: width of the query embeddings; defaults to ``lm_hidden`` (the projected
            Q-Former output lives in the LM's embedding space).
        detach_input: stop the value loss's gradient at the head's inputs.
    """

    def __init__(self, lm_hidden: int, hidden: int = 128, use_query: bool = False, query_dim: int | None = None,
                 detach_input: bool = False):
        super().__init__()
        self.lm_hidden = int(lm_hidden)
        self.use_query = bool(use_query)
        self.query_dim = int(query_dim if query_dim is not None else lm_hidden) if use_query else 0
        self.detach_input = bool(detach_input)
        self.net = nn.Sequential(nn.Linear(self.lm_hidden + self.query_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.normal_(self.net[2].weight, std=0.01)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, hidden_states: Tensor, query: Tensor | None = None) -> Tensor:
        """Values ``[B, T]`` (float32).

        Args:
            hidden_states: ``[B, T, H_lm]``, the LM hidden state at the position predicting each token.
            query: ``[B, H_q]`` mean-pooled query embeddings of each sample's image; required
                when ``use_query`` is set, ignored otherwise.
        """
        x = hidden_states.float()
        if self.use_query:
            if query is None:
                raise ValueError("ValueHead(use_query=True) needs the pooled query embeddings")
            q = query.float()[:, None, :].expand(-1, x.shape[1], -1)
            x = torch.cat([x, q], dim=-1)
        if self.detach_input:
            x = x.detach()
        return self.net(x).squeeze(-1)

    def extra_repr(self) -> str:
        return f"lm_hidden={self.lm_hidden}, use_query={self.use_query}, detach_input={self.detach_input}"
