"""The one table of dtypes: the name flags, config files and the wire use, the bytes per element, the short
aliases the planner accepts, and what each may be used for. torch's dtype is looked up by name on demand,
so the coordinator and the planner read this table without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from stagemesh.errors import InvalidArgument


@dataclass(frozen=True)
class DType:
    name: str  # torch's name for it: the flag value, the config value and the Tensor message's dtype
    bytes: int
    aliases: tuple[str, ...] = ()  # what `coordctl plan --dtype` also accepts
    serves: bool = False  # a mesh's weights and activations can be this
    on_wire: bool = True  # a Tensor message may carry it


TABLE = (
    DType("float32", 4, ("fp32",), serves=True),
    DType("bfloat16", 2, ("bf16",), serves=True),
    DType("float16", 2, ("fp16",), serves=True),
    DType("float64", 8, serves=True),  # the exactness tests' dtype
    DType("float8_e4m3fn", 1, ("fp8",), on_wire=False),  # planning only: what an fp8 checkpoint would take
    DType("int64", 8),
    DType("int32", 4),
    DType("uint8", 1),
)
BY_NAME = {d.name: d for d in TABLE}
SERVING_DTYPES = tuple(d.name for d in TABLE if d.serves)  # the choices of every --dtype that runs a mesh
PLANNING_DTYPES = tuple(n for d in TABLE if d.serves or not d.on_wire for n in (*d.aliases, d.name))
WIRE_DTYPES = tuple(d.name for d in TABLE if d.on_wire)


def lookup(name: str) -> DType:
    """The entry for a name or alias (case-insensitive); InvalidArgument naming the choices otherwise."""
    key = name.lower()
    for d in TABLE:
        if key == d.name or key in d.aliases:
            return d
    raise InvalidArgument(f"dtype {name!r}: choose one of {', '.join(SERVING_DTYPES)}")


def serving_dtype(name: str):
    """The torch dtype a mesh runs in (float32, bfloat16, float16, float64)."""
    d = lookup(name)
    if not d.serves:
        raise InvalidArgument(f"dtype {name!r}: choose one of {', '.join(SERVING_DTYPES)}")
    return torch_dtype(d.name)


def torch_dtype(name: str):
    import torch

    return getattr(torch, lookup(name).name)
