"""The rollout batch: what rollout actors produce, reward actors fill in and the learner consumes.

One Arrow record batch, one row per sampled caption. Images do not travel: ``image_row`` names
the dataset row, and every role opens the same dataset. Token lists are variable-length, so
padding is added only when the learner builds tensors (``to_tensors``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import torch

BASE_FIELDS = [
    pa.field("rollout_id", pa.string()),          # unique per row: "<actor>-<batch>-<i>"
    pa.field("batch_id", pa.string()),            # unique per generated batch, for exactly-once accounting
    pa.field("image_row", pa.int64()),            # row of the training split
    pa.field("sample_index", pa.int32()),         # 0..k-1 among the samples of that image
    pa.field("policy_version", pa.int64()),       # weights version that generated it
    pa.field("actor_id", pa.string()),
    pa.field("created_at", pa.float64()),         # unix time, for lag/latency metrics
    pa.field("text", pa.string()),
    pa.field("tokens", pa.list_(pa.int32())),     # generated tokens incl. EOS, no BOS, no padding
    pa.field("behaviour_logprobs", pa.list_(pa.float32())),  # log mu(token) under the sampling policy
]
REWARD_FIELD = pa.field("reward", pa.float32())   # weighted total; component columns are "r/<name>"
SCHEMA = pa.schema(BASE_FIELDS)


class SchemaError(ValueError):
    pass


def make_rollout_batch(*, batch_id: str, actor_id: str, policy_version: int, image_rows: list[int],
                       sample_index: list[int], texts: list[str], tokens: list[list[int]],
                       logprobs: list[list[float]]) -> pa.RecordBatch:
    n = len(texts)
    if not (len(image_rows) == len(sample_index) == len(tokens) == len(logprobs) == n):
        raise SchemaError("rollout columns differ in length")
    for i, (t, lp) in enumerate(zip(tokens, logprobs)):
        if len(t) != len(lp):
            raise SchemaError(f"row {i}: {len(t)} tokens but {len(lp)} log-probs")
    now = time.time()
    return pa.RecordBatch.from_pydict({
        "rollout_id": [f"{batch_id}-{i}" for i in range(n)], "batch_id": [batch_id] * n,
        "image_row": image_rows, "sample_index": sample_index, "policy_version": [policy_version] * n,
        "actor_id": [actor_id] * n, "created_at": [now] * n, "text": texts, "tokens": tokens,
        "behaviour_logprobs": logprobs,
    }, schema=SCHEMA)


def with_rewards(batch: pa.RecordBatch, total: torch.Tensor, components: dict[str, torch.Tensor]) -> pa.RecordBatch:
    """Append the reward and one ``r/<name>`` column per component."""
    if total.shape[0] != batch.num_rows:
        raise SchemaError(f"{total.shape[0]} rewards for {batch.num_rows} rollouts")
    arrays = list(batch.columns) + [pa.array(total.float().numpy(), pa.float32())]
    fields = list(batch.schema) + [REWARD_FIELD]
    for name, values in components.items():
        arrays.append(pa.array(values.float().numpy(), pa.float32()))
        fields.append(pa.field(f"r/{name}", pa.float32()))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def reward_components(batch: pa.RecordBatch) -> dict[str, torch.Tensor]:
    return {f.name[2:]: torch.tensor(batch.column(f.name).to_numpy(zero_copy_only=False))
            for f in batch.schema if f.name.startswith("r/")}


@dataclass
class RolloutTensors:
    """Padded tensors for the learner. Shapes: B rollouts, T = longest caption."""

    image_rows: torch.Tensor          # [B] long
    tokens: torch.Tensor              # [B, T] long, pad_id after the end
    mask: torch.Tensor                # [B, T] bool
    behaviour_logprobs: torch.Tensor  # [B, T] float, 0 at padding
    rewards: torch.Tensor             # [B] float
    policy_versions: torch.Tensor     # [B] long


def to_tensors(batch: pa.RecordBatch | pa.Table, pad_id: int) -> RolloutTensors:
    if "reward" not in batch.schema.names:
        raise SchemaError("batch has no 'reward' column: it was not scored")
    toks = batch.column("tokens").to_pylist()
    lps = batch.column("behaviour_logprobs").to_pylist()
    T = max(1, max(map(len, toks)))
    tokens = torch.full((len(toks), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(toks), T), dtype=torch.bool)
    blp = torch.zeros((len(toks), T))
    for i, (t, lp) in enumerate(zip(toks, lps)):
        tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        mask[i, : len(t)] = True
        blp[i, : len(lp)] = torch.tensor(lp)
    return RolloutTensors(
        image_rows=torch.tensor(batch.column("image_row").to_pylist()), tokens=tokens, mask=mask,
        behaviour_logprobs=blp, rewards=torch.tensor(batch.column("reward").to_pylist(), dtype=torch.float32),
        policy_versions=torch.tensor(batch.column("policy_version").to_pylist()))
