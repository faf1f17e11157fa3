"""Expert parallelism inside a stage: RemoteExperts takes the place of a MoE layer's experts. The stage
computes the router (gate, top-k) itself; RemoteExperts sends each expert worker only the tokens routed
to experts it holds (dispatch: one message per involved worker per layer, all in flight at once) and
adds up the weighted sums they return (combine).

Replicas: a (token, expert) pair goes to one live owner of that expert, spread over the owners by its
position; if a call fails, its pairs are sent again to the other owners and nothing is lost. An expert
with no live owner fails the step with UNAVAILABLE.

Who dispatches when tp > 1: after attention every TP rank holds the same hidden states. Rank r
dispatches rows [r*ceil(T/tp), (r+1)*ceil(T/tp)) and the ranks all-gather the combined rows: one
all-gather per MoE layer (where an in-stage MoE needs one all-reduce), and the dispatch bytes and
serialisation work split tp ways. A rank whose dispatch failed says so in the gathered tensor, so every
rank raises the same error and none waits on a collective.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
import torch.nn.functional as F
from stagemesh.errors import StagemeshError, Unavailable, error_for_code
from stagemesh.models.tp import TPRank
from stagemesh.proto import expert_pb2 as pb
from stagemesh.proto import expert_pb2_grpc as pb_grpc
from stagemesh.proto.rpc import channel, error_from_rpc
from stagemesh.proto.tensor_codec import decode, encode
from torch import nn

RETRY_AFTER_SECONDS = 5.0  # a worker whose call failed is avoided this long (unless it is the only owner)
# The statuses a dispatch can fail with, as carried through the TP all-gather (index + 1; 0 = no failure).
FAILURE_CODES = ("INVALID_ARGUMENT", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "INTERNAL")


def _failure_code(error: StagemeshError) -> str:
    return error.code if error.code in FAILURE_CODES else "INTERNAL"


@dataclass(frozen=True)
class ExpertDirectory:
    """Where the expert workers are, by index, from the coordinator's topology."""

    addresses: tuple[str, ...] = ()
    alive: tuple[bool, ...] = ()


class ExpertPool:
    """Blocking gRPC stubs to the expert workers, for the compute thread; remembers recent failures."""

    def __init__(self, directory: Callable[[], ExpertDirectory], timeout: float = 10.0) -> None:
        self.directory = directory
        self.timeout = timeout
        self._stubs: dict[str, pb_grpc.ExpertsStub] = {}
        self._failed_until: dict[int, float] = {}
        self._lock = threading.Lock()

    def usable(self, worker: int) -> bool:
        d = self.directory()
        live = worker < len(d.alive) and d.alive[worker] and bool(d.addresses[worker])
        return live and self._failed_until.get(worker, 0.0) <= time.monotonic()

    def stub(self, worker: int) -> pb_grpc.ExpertsStub:
        address = self.directory().addresses[worker]
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = pb_grpc.ExpertsStub(channel(address))
            return self._stubs[address]

    def mark_failed(self, worker: int) -> None:
        self._failed_until[worker] = time.monotonic() + RETRY_AFTER_SECONDS


class RemoteExperts(nn.Module):
    """Stands in for `Experts` in a stage whose MoE layers are served by expert workers."""

    def __init__(self, layer: int, owners: list[list[int]], pool: ExpertPool, tp: TPRank = TPRank()) -> None:
        super().__init__()
        self.layer = layer
        self.owners = owners  # owners[expert] = expert workers holding it, in preference order
        self.pool = pool
        self.tp = tp

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, D), ids (T, K) global expert ids, weights (T, K) float32 -> combined output (T, D)."""
        if self.tp.size == 1:
            return self.dispatch(x, ids, weights, excluded=frozenset())
        return self._dispatch_slice_and_gather(x, ids, weights)

    def _dispatch_slice_and_gather(self, x, ids, weights) -> torch.Tensor:
        t, rank, size = x.shape[0], self.tp.rank, self.tp.size
        per = math.ceil(t / size)
        rows = slice(min(t, rank * per), min(t, (rank + 1) * per))
        failure: StagemeshError | None = None
        try:
            local = self.dispatch(x[rows], ids[rows], weights[rows], excluded=frozenset())  # (<= per, D)
        except StagemeshError as e:
            local, failure = torch.zeros_like(x[rows]), e
        # One extra row says whether (and with which status) this rank's dispatch failed, so every rank raises
        # an error of the same class as the one a tp=1 stage would raise, and none waits on a collective.
        status = torch.zeros(1, x.shape[1], dtype=x.dtype, device=x.device)
        status[0, 0] = 0 if failure is None else 1 + FAILURE_CODES.index(_failure_code(failure))
        padded = torch.cat([F.pad(local, (0, 0, 0, per - local.shape[0])), status])  # (per + 1, D)
        parts = self.tp.all_gather(padded)
        if failure is not None:
            raise failure
        for r, part in enumerate(parts):
            if part[per, 0].item():
                code = FAILURE_CODES[int(part[per, 0].item()) - 1]
                raise error_for_code(code, f"layer {self.layer}: TP rank {r} of this stage: its expert dispatch failed")
        return torch.cat([p[:per] for p in parts])[:t]

    def dispatch(self, x, ids, weights, excluded: frozenset[int]) -> torch.Tensor:
        """Sends every (token, expert) pair with ids >= 0 to a live owner; returns the weighted sums (T, D)."""
        assignment = self._assign(ids, excluded)  # (T, K) expert worker per pair, -1 = none
        calls = []
        for worker in assignment.unique().tolist():
            if worker < 0:
                continue
            mine = assignment == worker  # (T, K)
            rows = mine.any(dim=1).nonzero()[:, 0]  # tokens this worker gets
            worker_ids = torch.where(mine[rows], ids[rows], -1)
            request = pb.ExpertRequest(
                layer=self.layer,
                hidden=encode(x[rows]),
                expert_ids=encode(worker_ids),
                weights=encode(weights[rows].float()),
            )
            future = self.pool.stub(worker).Compute.future(request, timeout=self.pool.timeout)
            calls.append((worker, rows, worker_ids, future))
        out = torch.zeros_like(x)
        for worker, rows, worker_ids, future in calls:
            out.index_add_(0, rows, self._result(worker, rows, worker_ids, future, x, weights, excluded))
        return out

    def _result(self, worker, rows, worker_ids, future, x, weights, excluded) -> torch.Tensor:
        try:
            return decode(future.result().output).to(x.dtype)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:  # a refusal: another owner would refuse it too
                raise error_from_rpc(e, f"expert worker {worker} (layer {self.layer})") from None
            self.pool.mark_failed(worker)
            # Send the same pairs to the other owners of their experts (replicas); Unavailable if there are none.
            return self.dispatch(x[rows], worker_ids, weights[rows], excluded | {worker})

    def _assign(self, ids: torch.Tensor, excluded: frozenset[int]) -> torch.Tensor:
        """(T, K) -> the expert worker serving each pair: its live owners in turn, by pair position."""
        assignment = torch.full_like(ids, -1)
        position = torch.arange(ids.numel(), device=ids.device).reshape(ids.shape)
        for expert in ids.unique().tolist():
            if expert < 0:
                continue
            owners = [w for w in self.owners[expert] if w not in excluded and self.pool.usable(w)]
            owners = owners or [w for w in self.owners[expert] if w not in excluded and self._only_hope(w)]
            if not owners:
                raise Unavailable(f"layer {self.layer}: no live expert worker holds expert {expert}")
            pick = torch.tensor(owners, device=ids.device)[(position + self.layer) % len(owners)]
            assignment = torch.where(ids == expert, pick, assignment)
        return assignment

    def _only_hope(self, worker: int) -> bool:
        """A recently failed but registered worker is still tried when no other owner is left."""
        d = self.pool.directory()
        return worker < len(d.addresses) and bool(d.addresses[worker])
