"""torch.Tensor <-> the Tensor message: dtype name, shape, raw little-endian bytes (nothing pickled)."""

from __future__ import annotations

import sys

import torch
from stagemesh.errors import InvalidArgument
from stagemesh.models.dtypes import WIRE_DTYPES, torch_dtype
from stagemesh.proto import tensor_pb2

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts are not supported"

DTYPES = {name: torch_dtype(name) for name in WIRE_DTYPES}
NAMES = {v: k for k, v in DTYPES.items()}


def encode(t: torch.Tensor) -> tensor_pb2.Tensor:
    t = t.detach().to("cpu").contiguous()
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(dtype=NAMES[t.dtype], shape=list(t.shape), data=data)


def decode(msg: tensor_pb2.Tensor) -> torch.Tensor:
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument(f"tensor dtype {msg.dtype!r} is not one of {', '.join(DTYPES)}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = itemsize
    for d in shape:
        expected *= d
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"tensor of shape {list(shape)} and dtype {msg.dtype} needs {expected} bytes, got {len(msg.data)}"
        )
    if not expected:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(msg.data), dtype=torch.uint8).view(dtype).reshape(shape)
