"""Weight push at BLIP-2 size: the packed wire (vlrm.wire) against the dict of tensors it replaced.

The learner publishes the trainable tensors every step and each rollout actor loads them between
batches. This times both halves side by side, in alternating rounds (median of ``--rounds``):

- publish (learner side): trainable tensors -> ``ray.put``. Before: a CPU copy of each tensor,
  then the dict put (bfloat16 tensors are pickled). Now: the tensors packed straight into a reused
  (pinned on a GPU) buffer, one ``ray.put`` of a single ``uint8`` array;
- load (rollout actor, a Ray actor holding the same tensors on its device): ``ray.get`` and the
  copy into its parameters. Before: one host-to-device copy per tensor. Now: one transfer of the
  packed buffer, then on-device copies;
- and checks that the actor's tensors equal the learner's after each load.

The tensors have the shapes of what trains in the production config (``--size real``): the BLIP-2
Q-Former (transformers' default ``Blip2QFormerConfig``), 32 query tokens, the projection to
OPT-2.7B's 2,560 wide stream, LoRA r=8 on the q/k/v/out projections of its 32 layers and the value
head (512 hidden), about 114 M parameters, random values; ``--size tiny`` is a smoke test.

    python benchmarks/bench_weights.py --device cuda --dtype bfloat16       # the GPU table in BENCHMARKS.md
    python benchmarks/bench_weights.py --size tiny --rounds 2                # smoke (tests)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlrm.wire import packed_nbytes, weights_from_wire, weights_to_wire  # noqa: E402


def trainable_tensors(size: str, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors shaped like the production policy's trainable set (see the module doc)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    if size == "real":
        qcfg, hidden, layers, lora_r, value_hidden = Blip2QFormerConfig(), 2560, 32, 8, 512
    elif size == "tiny":
        qcfg = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  encoder_hidden_size=32)
        hidden, layers, lora_r, value_hidden = 48, 2, 4, 16
    else:
        raise ValueError(f"size must be 'real' or 'tiny', got {size!r}")
    with torch.device(device):
        qformer = Blip2QFormerModel(qcfg).to(dtype)
        sd = {f"qformer.{k}": v.detach() for k, v in qformer.state_dict().items()}
        q = qcfg.hidden_size
        sd["query_tokens"] = torch.randn(1, 32, q, dtype=dtype)
        sd["language_projection.weight"] = torch.randn(hidden, q, dtype=dtype)
        sd["language_projection.bias"] = torch.randn(hidden, dtype=dtype)
        for i in range(layers):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                base = f"language_model.layers.{i}.self_attn.{proj}"
                sd[f"{base}.lora_A.weight"] = torch.randn(lora_r, hidden, dtype=dtype)
                sd[f"{base}.lora_B.weight"] = torch.randn(hidden, lora_r, dtype=dtype)
        sd["value_head.0.weight"] = torch.randn(value_hidden, hidden, dtype=dtype)
        sd["value_head.0.bias"] = torch.randn(value_hidden, dtype=dtype)
        sd["value_head.2.weight"] = torch.randn(1, value_hidden, dtype=dtype)
        sd["value_head.2.bias"] = torch.randn(1, dtype=dtype)
    return sd


def dict_wire(sd: dict[str, torch.Tensor]) -> dict:
    """The wire before the packed one: each tensor copied to the CPU on its own; float32/float16
    as numpy arrays, bfloat16 (no numpy dtype) as torch tensors, pickled by ``ray.put``."""
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu", copy=True)
        out[k] = v if v.dtype == torch.bfloat16 else v.contiguous().numpy()
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Holder:
    """A rollout actor's side: the same tensors on its device, loaded from either wire."""

    def __init__(self, size: str, device: str, dtype: str):
        self.device = device
        self.params = trainable_tensors(size, device, getattr(torch, dtype))

    def load(self, refs: list, packed: bool) -> float:
        import warnings

        import ray

        t0 = time.perf_counter()
        wire = ray.get(refs[0])
        if packed:
            state = weights_from_wire(wire, device=self.device)
        else:
            with warnings.catch_warnings():  # read-only numpy arrays from the object store
                warnings.simplefilter("ignore", UserWarning)
                state = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in wire.items()}
        with torch.no_grad():
            for k, v in state.items():
                self.params[k].copy_(v.to(self.device))
        sync(self.device)
        return time.perf_counter() - t0

    def checksum(self) -> list[float]:
        return [float(v.double().sum()) for v in self.params.values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("real", "tiny"), default="real")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()

    import ray

    gpu = a.device.startswith("cuda")
    ray.init(num_cpus=2, num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
    try:
        sd = trainable_tensors(a.size, a.device, getattr(torch, a.dtype))
        n = sum(v.numel() for v in sd.values())
        holder = ray.remote(Holder).options(num_gpus=0.5 if gpu else 0, num_cpus=1).remote(a.size, a.device, a.dtype)
        staging = torch.empty(packed_nbytes(sd), dtype=torch.uint8, pin_memory=gpu)

        def publish(packed: bool) -> tuple[float, object]:
            sync(a.device)
            t0 = time.perf_counter()
            if packed:  # as LearnerWorker.publish: packed from the tensors into the staging buffer
                ref = ray.put(weights_to_wire(sd, staging))
            else:
                ref = ray.put(dict_wire(sd))
            return time.perf_counter() - t0, ref

        times: dict[str, list[float]] = {k: [] for k in ("pub_dict", "pub_packed", "load_dict", "load_packed")}
        for r in range(a.rounds + 1):  # round 0 warms up both paths
            for packed in (False, True):
                with torch.no_grad():
                    for v in sd.values():  # new weights each round, as after an update
                        v.add_(1e-3)
                pub_s, ref = publish(packed)
                load_s = ray.get(holder.load.remote([ref], packed))
                want = [float(v.double().sum()) for v in sd.values()]
                if ray.get(holder.checksum.remote()) != want:
                    raise AssertionError(f"round {r}: the actor's tensors differ from the learner's "
                                         f"({'packed' if packed else 'dict'} wire)")
                if r:
                    name = "packed" if packed else "dict"
                    times[f"pub_{name}"].append(pub_s)
                    times[f"load_{name}"].append(load_s)
                del ref
        med = {k: statistics.median(v) for k, v in times.items()}
        dev = torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine()
        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, device {a.device} ({dev}); torch "
              f"{torch.__version__}, Ray {ray.__version__}")
        print(f"command: python benchmarks/bench_weights.py {' '.join(sys.argv[1:])}")
        print(f"weights: {len(sd)} tensors, {n / 1e6:.1f} M parameters, {a.dtype}, "
              f"{packed_nbytes(sd) / 2**20:.0f} MiB packed; median of {a.rounds} alternating rounds; "
              f"the actor's tensors equal the learner's after every load")
        print(f"{'measure (ms)':<44}{'dict of tensors':>16}{'packed':>10}{'ratio':>8}")
        for label, key in (("publish: tensors -> ray.put (learner)", "pub"),
                           ("load: ray.get -> in the actor's tensors", "load")):
            d, q = med[f"{key}_dict"] * 1e3, med[f"{key}_packed"] * 1e3
            print(f"{label:<44}{d:>16.1f}{q:>10.1f}{q / d:>8.2f}")
        d = (med["pub_dict"] + med["load_dict"]) * 1e3
        q = (med["pub_packed"] + med["load_packed"]) * 1e3
        print(f"{'publish + load':<44}{d:>16.1f}{q:>10.1f}{q / d:>8.2f}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
