"""The weights the learner publishes, as one flat byte buffer plus an index.

At BLIP-2 size the trainable tensors (Q-Former, query tokens, projection, LoRA, value head) are
about 114 M parameters in a few hundred tensors. Pickling a dict of bfloat16 torch tensors into
the object store (numpy has no bfloat16) cost the learner 0.36-0.50 s per step on an H200, and
every reader deserialised its own copy (BENCHMARKS.md, "What does a weight push cost?"). Packed into one ``uint8``
numpy array, the object is a single buffer: ``ray.put`` is one copy, and every actor on a node
maps the same shared memory (numpy is zero-copy in Ray's object store) and moves it to its
device in one transfer.

Layout: ``{"format": WIRE_FORMAT, "header": msgpack bytes, "data": uint8[n]}``. The header is
``{"index": [[name, dtype, shape, offset], ...], "version": int, "nbytes": n}`` in msgpack, and
the data a plain byte array: nothing in a wire is a pickled torch or library object, so the
learner and a rollout actor in another Python environment (the vLLM one, with other torch and
transformers versions) read it alike. Each tensor starts at a multiple of :data:`ALIGN` bytes.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import msgpack
import torch

__all__ = ["WIRE_FORMAT", "ALIGN", "packed_nbytes", "weights_to_wire", "weights_from_wire", "wire_header"]

WIRE_FORMAT = "vlrm-flat-2"
ALIGN = 64  # bytes; any dtype's view of a slice starting here is aligned


def _layout(sd: Mapping[str, torch.Tensor]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    index, offset = [], 0
    for name, t in sd.items():
        index.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset))
        offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return index, offset


def packed_nbytes(sd: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the packed buffer of ``sd`` (to size a reusable :func:`weights_to_wire` buffer)."""
    return _layout(sd)[1]


def _view(data: torch.Tensor, dtype: str, shape: tuple[int, ...], offset: int) -> torch.Tensor:
    dt = getattr(torch, dtype)
    return data[offset:offset + math.prod(shape) * dt.itemsize].view(dt).view(shape)


def weights_to_wire(sd: Mapping[str, torch.Tensor], buffer: torch.Tensor | None = None,
                    version: int = 0) -> dict[str, Any]:
    """Pack ``sd`` (tensors on any device) into one CPU byte buffer.

    ``buffer``: a ``uint8`` CPU tensor of at least :func:`packed_nbytes` bytes to pack into and
    return a view of (the learner keeps one in pinned memory, so copies from the GPU run
    asynchronously and nothing is allocated per step); the caller must not reuse it while the
    returned wire is in use (``ray.put`` copies it, so after that it is free). Without one, a new
    buffer is allocated.
    """
    index, nbytes = _layout(sd)
    if buffer is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    elif buffer.dtype != torch.uint8 or buffer.device.type != "cpu" or buffer.numel() < nbytes:
        raise ValueError(f"buffer must be a uint8 CPU tensor of >= {nbytes} bytes, got {buffer.dtype} "
                         f"x {buffer.numel()} on {buffer.device}")
    data = buffer[:nbytes]
    from_cuda = False
    for (_, dtype, shape, offset), t in zip(index, sd.values()):
        from_cuda |= t.is_cuda
        _view(data, dtype, shape, offset).copy_(t.detach(), non_blocking=t.is_cuda and data.is_pinned())
    if from_cuda:
        torch.cuda.synchronize()  # the non-blocking copies must land before the buffer is read
    header = msgpack.packb({"index": [[n, d, list(sh), o] for n, d, sh, o in index], "version": int(version),
                            "nbytes": int(nbytes)})
    return {"format": WIRE_FORMAT, "header": header, "data": data.numpy()}


def wire_header(wire: Mapping[str, Any]) -> dict[str, Any]:
    """The decoded msgpack header of a wire (index, version, nbytes)."""
    if not isinstance(wire, Mapping) or wire.get("format") != WIRE_FORMAT:
        got = wire.get("format") if isinstance(wire, Mapping) else type(wire).__name__
        raise ValueError(f"not a packed weights wire (format {got!r}, expected {WIRE_FORMAT!r})")
    return msgpack.unpackb(wire["header"])


def weights_from_wire(wire: Mapping[str, Any], device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a packed wire, as views of one buffer: on the CPU, of the wire's own memory
    (zero-copy from the object store, read-only: only ever copy from them); with ``device``, of
    one copy of the whole buffer there (one host-to-device transfer instead of one per tensor)."""
    header = wire_header(wire)
    if wire["data"].nbytes < header["nbytes"]:
        raise ValueError(f"packed weights wire is truncated: {wire['data'].nbytes} bytes of {header['nbytes']}")
    import warnings

    with warnings.catch_warnings():  # numpy arrays from the object store are read-only
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(wire["data"])
    if device is not None and torch.device(device) != data.device:
        data = data.to(device)
    return {name: _view(data, dtype, tuple(shape), offset) for name, dtype, shape, offset in header["index"]}
