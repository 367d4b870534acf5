"""The packed weights wire (vlrm.wire): what the learner publishes and rollout actors load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlrm.wire import ALIGN, WIRE_FORMAT, packed_nbytes, weights_from_wire, weights_to_wire, wire_header


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"qformer.w": torch.randn(5, 3, generator=g).to(torch.bfloat16),  # 30 bytes: next one is padded
            "value_head.b": torch.randn(7, generator=g),
            "lora_A": torch.randn(2, 3, 4, generator=g).to(torch.float16),
            "query_tokens": torch.randn(1, 3, 2, generator=g).to(torch.bfloat16),
            "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4)}


def test_round_trip_keeps_names_dtypes_shapes_and_values():
    sd = _state()
    wire = weights_to_wire(sd, version=7)
    assert wire["format"] == WIRE_FORMAT and wire["data"].dtype == np.uint8
    assert set(wire) == {"format", "header", "data"} and isinstance(wire["header"], bytes)  # msgpack, no pickle
    header = wire_header(wire)
    assert header["version"] == 7 and header["nbytes"] == packed_nbytes(sd)
    assert all(offset % ALIGN == 0 for *_, offset in header["index"])
    assert wire["data"].nbytes == packed_nbytes(sd) == 4 * ALIGN + 64  # 30, 28, 48, 12, 4 bytes; 0 for empty
    back = weights_from_wire(wire)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)


def test_views_share_one_buffer_and_a_reused_buffer_is_overwritten():
    sd = _state()
    buf = torch.full((packed_nbytes(sd) + 100,), 255, dtype=torch.uint8)
    wire = weights_to_wire(sd, buf)
    assert wire["data"].nbytes == packed_nbytes(sd)  # a view of the front of the larger buffer
    back = weights_from_wire(wire)
    assert back["scalar"].item() == 2.5
    weights_to_wire({k: v * 2 for k, v in sd.items()}, buf)  # the learner's next publish
    assert back["scalar"].item() == 5.0  # the views alias the buffer: ray.put must copy it first
    with pytest.raises(ValueError, match="uint8 CPU tensor of >= "):
        weights_to_wire(sd, torch.empty(16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 CPU tensor"):
        weights_to_wire(sd, torch.empty(1024, dtype=torch.int16))


def test_rejects_what_is_not_a_packed_wire():
    with pytest.raises(ValueError, match="not a packed weights wire"):
        weights_from_wire({"qformer.w": np.zeros(3, dtype=np.float32)})


def test_read_only_object_store_arrays_load_into_a_model():
    sd = _state()
    wire = weights_to_wire(sd)
    wire["data"].setflags(write=False)  # as numpy arrays come out of Ray's object store
    params = {k: torch.zeros_like(v) for k, v in sd.items()}
    for k, v in weights_from_wire(wire, device="cpu").items():
        params[k].copy_(v)
    for k in sd:
        torch.testing.assert_close(params[k], sd[k], rtol=0, atol=0)



def test_a_truncated_wire_is_refused_naming_the_sizes():
    wire = weights_to_wire(_state())
    wire["data"] = wire["data"][:100]
    with pytest.raises(ValueError, match="truncated: 100 bytes of"):
        weights_from_wire(wire)
