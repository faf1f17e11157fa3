"""Property-based fuzzing (hypothesis) of a running mesh's RPCs with random and malformed messages: the
public Generation API, a stage's internal Forward stream and an expert worker's Compute.

Every answer must be a clean status (OK or one that names what the caller did wrong; never INTERNAL or
UNKNOWN for bad input), no process may die, and afterwards a valid request is exact and no KV block is
left in use. One mesh (tiny Mixtral, pp=2, ep=2, float64) serves every property.
STAGEMESH_FUZZ_EXAMPLES sets the examples per property (default 300); runs are derandomized (repeatable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stagemesh.coordinator.client import cluster_status
from stagemesh.gateway.client import Client, GenerationParams
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.requests import GenerationRequest
from stagemesh.proto import expert_pb2, expert_pb2_grpc, generation_pb2, generation_pb2_grpc, stage_pb2, stage_pb2_grpc
from stagemesh.proto import tensor_pb2 as tpb
from stagemesh.proto.rpc import channel
from stagemesh.proto.tensor_codec import DTYPES
from support import MeshProcess, wait_kv_free

EXAMPLES = int(os.environ.get("STAGEMESH_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
CALL_TIMEOUT = 30.0  # a hang shows up as DEADLINE_EXCEEDED, which is not clean
# What bad input may get. UNAVAILABLE only for a step from an old epoch, or one the stage has not heard of (the
# caller must refresh its topology).
CLEAN = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.CANCELLED,  # only ever from our own cancel after a few streamed messages
}
HIDDEN, VOCAB = 64, 512  # the tiny Mixtral
GOOD_PROMPT = [5, 9, 23, 42, 7]

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32) | st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 0.5, 1.0, 3e38, float("inf"), float("nan")])


@pytest.fixture(scope="module")
def mesh(checkpoint):
    m = MeshProcess(checkpoint("mixtral"), "--pp", "2", "--ep", "2", "--dtype", "float64")
    yield m
    assert m.stop() == 0


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The reference engine's greedy tokens for the health-check request."""
    engine = ReferenceEngine(checkpoint("mixtral"), dtype=torch.float64)
    return engine.generate([GenerationRequest(tuple(GOOD_PROMPT), 8, ignore_eos=True)])[0].token_ids


@dataclass(frozen=True)
class Targets:
    """Where the internal services are, and what a plausible step carries (short, for failure reports)."""

    stage_addresses: tuple[str, ...]
    expert_addresses: tuple[str, ...]
    pipeline_epoch: int
    kv_blocks: int
    expert_groups: tuple[tuple[int, ...], ...]  # expert ids each expert worker holds


@pytest.fixture(scope="module")
def topology(mesh) -> Targets:
    t = cluster_status(mesh.coordinator).topology
    groups = tuple(tuple(g.expert_ids) for g in t.plan.expert_groups)
    return Targets(tuple(t.stage_addresses), tuple(t.expert_addresses), t.pipeline_epoch, t.kv_blocks, groups)


def _assert_clean(code: grpc.StatusCode, details: str) -> None:
    assert code in CLEAN or (code == grpc.StatusCode.UNAVAILABLE and "topology changed" in details), (code, details)
    assert code == grpc.StatusCode.OK or details, f"{code.name} without a message"


def _assert_healthy(mesh: MeshProcess, expected: list[int]) -> None:
    """No process died, a valid request is exact, no KV block is left in use anywhere."""
    assert all(c.is_running() for c in mesh.children), "a mesh process died"
    with Client(mesh.gateway, timeout=60) as client:
        assert client.generate(GenerationParams(GOOD_PROMPT, max_tokens=8, ignore_eos=True)).token_ids == expected
    wait_kv_free(mesh.coordinator)


# ---- stagemesh.v1.Generation ----


@st.composite
def generate_requests(draw) -> generation_pb2.GenerateRequest:
    """Mostly servable requests with odd but legal settings; each field absurd now and then."""
    msg = generation_pb2.GenerateRequest()
    kind = draw(st.sampled_from(["ids"] * 6 + ["text"] * 3 + ["none"]))
    if kind == "text":
        msg.text = draw(mostly(st.text(min_size=1, max_size=40), st.text(max_size=2) | st.just("x" * 600)))
    elif kind == "ids":
        ids = mostly(
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40),
            st.lists(st.integers(0, VOCAB + 5) | u32, max_size=30) | st.lists(st.integers(0, VOCAB - 1), max_size=520),
        )
        msg.token_ids.ids.extend(draw(ids))
    optional = {
        "max_tokens": mostly(st.integers(1, 6), st.integers(-3, 0) | i32),
        "temperature": mostly(st.sampled_from([0.0, 0.8, 1e-45, 3e38, float("inf")]), f32),
        "top_p": mostly(st.sampled_from([1.0, 0.9, 1e-45]), f32),
        "top_k": mostly(st.sampled_from([0, 1, 5, 2**31 - 1]), i32),
        "seed": u64,
    }
    for name, values in optional.items():
        if draw(st.integers(0, 3)) > 0:
            setattr(msg, name, draw(values))
    stops = mostly(st.lists(st.text(max_size=3), max_size=3), st.lists(st.text(max_size=300), max_size=20))
    msg.stop.extend(draw(stops))
    msg.stop_token_ids.extend(draw(st.lists(st.integers(0, VOCAB - 1) | u32, max_size=4)))
    msg.ignore_eos = draw(st.booleans())
    msg.logprobs = draw(mostly(st.integers(0, 20), i32))
    msg.request_id = draw(st.text(max_size=40))
    return msg


def _generate(stub, msg: generation_pb2.GenerateRequest, complete: bool) -> None:
    """One call; a stream is read for at most 3 messages, then cancelled (that frees its KV too)."""
    try:
        if complete:
            stub.Complete(msg, timeout=CALL_TIMEOUT)
            return
        call = stub.Generate(msg, timeout=CALL_TIMEOUT)
        for n, _ in enumerate(call):
            if n == 2:
                call.cancel()
    except grpc.RpcError as e:
        _assert_clean(e.code(), e.details())


@FUZZ
@given(msg=generate_requests(), complete=st.booleans())
def test_fuzz_generation_api(mesh, msg, complete):
    with channel(mesh.gateway, public=True) as ch:
        bounded = msg.HasField("max_tokens") and msg.max_tokens <= 6
        _generate(generation_pb2_grpc.GenerationStub(ch), msg, complete and bounded)


@FUZZ
@given(data=st.binary(max_size=200), method=st.sampled_from(["Generate", "Complete", "ModelInfo"]))
def test_fuzz_generation_api_with_garbage_bytes(mesh, data, method):
    path = f"/stagemesh.v1.Generation/{method}"
    with channel(mesh.gateway, public=True) as ch:
        try:
            if method == "Generate":
                for n, _ in enumerate(ch.unary_stream(path)(data, timeout=CALL_TIMEOUT)):
                    assert n < 300
            else:
                ch.unary_unary(path)(data, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            _assert_clean(e.code(), e.details())


def test_generation_api_is_healthy_after_fuzzing(mesh, expected):
    _assert_healthy(mesh, expected)


# ---- stagemesh.v1.Stage/Forward ----


@st.composite
def tensors(draw, rows: int, cols: int) -> tpb.Tensor:
    """Mostly well-formed (rows, cols) float64 tensors with odd values; else wrong dtypes, shapes, lengths."""
    dtype = draw(st.sampled_from(["float64"] * 40 + [*DTYPES, "complex128", ""]))
    shape = [rows, cols] if draw(st.integers(0, 7)) else draw(st.lists(st.integers(-2, 70), max_size=3))
    if draw(st.integers(0, 9)) == 0:
        return tpb.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=600)))
    count = 1
    for d in shape:
        count *= max(d, 0)
    torch_dtype = DTYPES.get(dtype, torch.float64)
    if count > 5000:
        return tpb.Tensor(dtype=dtype, shape=shape, data=b"")
    values = draw(st.sampled_from(["randn", "nan", "inf", "huge", "zeros"]))
    t = {"randn": torch.randn, "zeros": torch.zeros}.get(values, torch.zeros)(count, dtype=torch.float64)
    if values in ("nan", "inf", "huge"):
        t[:: max(1, count // 3)] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e300}[values]
    data = t.to(torch_dtype).view(torch.uint8).numpy().tobytes() if count else b""
    return tpb.Tensor(dtype=dtype, shape=shape, data=data)


def mostly(valid: st.SearchStrategy, absurd: st.SearchStrategy, odds: int = 8) -> st.SearchStrategy:
    """`valid` odds-1 times in odds, else `absurd`: a message needs all its fields right to get far in."""
    return st.integers(1, odds).flatmap(lambda k: absurd if k == 1 else valid)


def sampling_params() -> st.SearchStrategy:
    return st.builds(
        stage_pb2.SamplingParams,
        temperature=mostly(st.sampled_from([0.0, 0.8, 1e-45, 3e38]), f32),
        top_p=mostly(st.sampled_from([0.0, 1.0, 0.9, 1e-45]), f32),
        top_k=mostly(st.sampled_from([0, 1, 5, 2**31 - 1]), i32),
        seed=u64,
        logprobs=mostly(st.integers(0, 20), i32),
    )


@st.composite
def seq_steps(draw, kv_len: dict[int, int], used: set[int], num_blocks: int) -> stage_pb2.SeqStep:
    """Mostly a plausible chunk (a new sequence at 0 with its blocks, or a known one where it left off, not
    yet in this step), else absurd positions, lengths, ids and block tables."""
    if draw(st.integers(0, 3)) > 0:
        known = sorted(set(kv_len) - used)
        fresh = max([k for k in kv_len if k < 1000] + [0]) + 1
        seq_id = draw(st.sampled_from(known) if known and draw(st.booleans()) else st.just(fresh))
        start = kv_len.get(seq_id, 0)
        n = draw(st.integers(1, 8))
        table = draw(st.lists(st.integers(0, num_blocks - 1), min_size=1, max_size=2)) if start == 0 else []
    else:
        seq_id = draw(st.integers(1, 9) | u64)
        start, n = draw(st.integers(0, 40) | u32), draw(st.integers(0, 12) | u32)
        table = draw(st.lists(st.integers(0, num_blocks + 1) | u32, max_size=3))
    kv_len[seq_id] = min(start + n, 2**32 - 1)
    used.add(seq_id)
    return stage_pb2.SeqStep(
        seq_id=seq_id,
        start_pos=start,
        num_tokens=n,
        block_table=table,
        wants_token=draw(st.booleans()),
        sampling=draw(sampling_params()),
        draw_index=draw(st.integers(0, 5) | u32),
    )


@st.composite
def forward_steps(draw, first: bool, epoch: int, num_blocks: int) -> list[stage_pb2.Step]:
    """1-3 steps of one stream, with their token ids (first stage) or activations (later stages)."""
    steps, kv_len = [], {}
    for step_id in range(draw(st.integers(1, 3))):
        used: set[int] = set()
        seqs = [draw(seq_steps(kv_len, used, num_blocks)) for _ in range(draw(mostly(st.integers(1, 3), st.just(0))))]
        n = sum(s.num_tokens for s in seqs) if all(s.num_tokens < 100 for s in seqs) else 3
        step = stage_pb2.Step(
            step_id=draw(st.just(step_id) | u64),
            epoch=draw(st.sampled_from([epoch] * 12 + [epoch + 1, 0, epoch - 1, 2**64 - 1])),
            seqs=seqs,
            release=draw(st.lists(st.sampled_from(sorted(kv_len)) if kv_len else u64, max_size=2)),
        )
        if first:
            ids = st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n) | st.lists(u32, max_size=n + 2)
            step.token_ids.extend(draw(ids))
        if not first or draw(st.integers(0, 4)) == 0:
            step.hidden.CopyFrom(draw(tensors(n, HIDDEN)))
        steps.append(step)
    return steps


def _forward(address: str, steps: list[stage_pb2.Step]) -> None:
    with channel(address) as ch:
        try:
            for result in stage_pb2_grpc.StageStub(ch).Forward(iter(steps), timeout=CALL_TIMEOUT):
                if result.HasField("failure"):
                    _assert_clean(getattr(grpc.StatusCode, result.failure.code), result.failure.message)
        except grpc.RpcError as e:
            _assert_clean(e.code(), e.details())


@FUZZ
@given(data=st.data(), stage=st.sampled_from([0, 1]))
def test_fuzz_stage_forward(mesh, topology, data, stage):
    num_blocks = topology.kv_blocks
    steps = data.draw(forward_steps(stage == 0, topology.pipeline_epoch, num_blocks))
    _forward(topology.stage_addresses[stage], steps)


@FUZZ
@given(data=st.lists(st.binary(max_size=120), min_size=1, max_size=3), stage=st.sampled_from([0, 1]))
def test_fuzz_stage_forward_with_garbage_bytes(mesh, topology, data, stage):
    with channel(topology.stage_addresses[stage]) as ch:
        try:
            for n, _ in enumerate(ch.stream_stream("/stagemesh.v1.Stage/Forward")(iter(data), timeout=CALL_TIMEOUT)):
                assert n < 10
        except grpc.RpcError as e:
            _assert_clean(e.code(), e.details())


def test_stages_are_healthy_after_fuzzing(mesh, expected):
    _assert_healthy(mesh, expected)


# ---- stagemesh.v1.Experts/Compute ----


@st.composite
def expert_requests(draw, held: tuple[int, ...]) -> expert_pb2.ExpertRequest:
    """Mostly routed pairs this worker holds (or -1), with odd hidden values and weights; else anything."""
    tokens, k = draw(st.integers(0, 6)), draw(mostly(st.just(2), st.sampled_from([0, 1, 3])))
    pair = mostly(st.sampled_from([-1, *held]), st.integers(-3, 9) | st.integers(-(2**63), 2**63 - 1))
    ids = draw(st.lists(pair, min_size=tokens * k, max_size=tokens * k))
    ids_msg = tpb.Tensor(dtype="int64", shape=[tokens, k], data=torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    if draw(st.integers(0, 9)) == 0:
        ids_msg = draw(tensors(tokens, k))
    weights = draw(tensors(tokens, k))
    if draw(st.integers(0, 3)) > 0:
        w = torch.tensor(draw(st.lists(f32, min_size=tokens * k, max_size=tokens * k)), dtype=torch.float32)
        weights = tpb.Tensor(dtype="float32", shape=[tokens, k], data=w.numpy().tobytes())
    return expert_pb2.ExpertRequest(
        layer=draw(st.integers(0, 5) | u32), hidden=draw(tensors(tokens, HIDDEN)), expert_ids=ids_msg, weights=weights
    )


@FUZZ
@given(data=st.data(), worker=st.sampled_from([0, 1]))
def test_fuzz_expert_compute(mesh, topology, data, worker):
    request = data.draw(expert_requests(topology.expert_groups[worker]))
    with channel(topology.expert_addresses[worker]) as ch:
        try:
            reply = expert_pb2_grpc.ExpertsStub(ch).Compute(request, timeout=CALL_TIMEOUT)
            assert list(reply.output.shape) == list(request.hidden.shape)
        except grpc.RpcError as e:
            _assert_clean(e.code(), e.details())


@FUZZ
@given(data=st.binary(max_size=300), worker=st.sampled_from([0, 1]))
def test_fuzz_expert_compute_with_garbage_bytes(mesh, topology, data, worker):
    with channel(topology.expert_addresses[worker]) as ch:
        try:
            ch.unary_unary("/stagemesh.v1.Experts/Compute")(data, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            _assert_clean(e.code(), e.details())


def test_experts_are_healthy_after_fuzzing(mesh, expected):
    _assert_healthy(mesh, expected)
