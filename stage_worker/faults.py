"""Test-only fault injection for a stage worker, off unless STAGEMESH_FAULT_OOM_TOKENS is set: then the
stage's engine raises torch.OutOfMemoryError, as the CUDA allocator would, for a step of more than that
many tokens.

STAGEMESH_FAULT_OOM_AT says where: "reserve" (default: the step's workspace reservation fails, before any
collective) or "forward" (inside the forward, after the stage's last layer wrote its KV).
STAGEMESH_FAULT_OOM_STAGE and STAGEMESH_FAULT_OOM_RANK limit it to one stage and one TP rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PLACES = ("reserve", "forward")


@dataclass(frozen=True)
class OomFault:
    tokens: int  # steps of more than this many tokens fail
    at: str = "reserve"  # one of PLACES

    def check(self, num_tokens: int, where: str) -> None:
        if where == self.at and num_tokens > self.tokens:
            raise torch.OutOfMemoryError(
                f"injected out-of-memory: a step of {num_tokens} tokens (STAGEMESH_FAULT_OOM_TOKENS={self.tokens})"
            )


def oom_fault(stage: int, rank: int, environ=os.environ) -> OomFault | None:
    """The fault this worker (stage, TP rank) is to inject, from the environment; None when there is none."""
    if "STAGEMESH_FAULT_OOM_TOKENS" not in environ:
        return None
    for name, mine in (("STAGEMESH_FAULT_OOM_STAGE", stage), ("STAGEMESH_FAULT_OOM_RANK", rank)):
        if environ.get(name, str(mine)) != str(mine):
            return None
    at = environ.get("STAGEMESH_FAULT_OOM_AT", "reserve")
    if at not in PLACES:
        raise ValueError(f"STAGEMESH_FAULT_OOM_AT must be one of {', '.join(PLACES)}, got {at!r}")
    return OomFault(int(environ["STAGEMESH_FAULT_OOM_TOKENS"]), at)
