"""The committed stubs are exactly what `python -m stagemesh.proto.build` makes; the tensor codec is exact."""

from __future__ import annotations

import pytest
import torch
from stagemesh.errors import InvalidArgument
from stagemesh.proto import build, tensor_pb2
from stagemesh.proto.tensor_codec import decode, encode


def test_generated_stubs_match_the_proto_files(tmp_path):
    written = build.generate(tmp_path)
    assert {p.name for p in written} == {p.name for p in build.PROTO_DIR.glob("*_pb2*.py")}
    for path in written:
        committed = build.PROTO_DIR / path.name
        assert path.read_bytes() == committed.read_bytes(), f"{path.name} is stale: run python -m stagemesh.proto.build"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64])
def test_tensor_roundtrip_is_bit_exact(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    msg = encode(t)
    assert msg.dtype == str(dtype).removeprefix("torch.") and list(msg.shape) == [3, 5, 7]
    assert len(msg.data) == t.numel() * t.element_size()  # bf16 travels as its 2-byte form
    back = decode(tensor_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_empty_tensor_roundtrip():
    assert decode(encode(torch.empty(0, 64))).shape == (0, 64)


@pytest.mark.parametrize(
    "msg,message",
    [
        (tensor_pb2.Tensor(dtype="complex128", shape=[1], data=b"x" * 16), "dtype 'complex128'"),
        (tensor_pb2.Tensor(dtype="float32", shape=[2, 2], data=b"x" * 12), "needs 16 bytes, got 12"),
        (tensor_pb2.Tensor(dtype="float32", shape=[-1], data=b""), "negative"),
    ],
)
def test_malformed_tensors_are_refused(msg, message):
    with pytest.raises(InvalidArgument, match=message):
        decode(msg)
