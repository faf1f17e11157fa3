"""Bad input and failures in a running mesh get clear errors; the mesh keeps serving what it can."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import torch
from click.testing import CliRunner
from stagemesh.cli import main
from stagemesh.coordinator.client import cluster_status
from stagemesh.gateway.client import Client, GenerationParams
from stagemesh.proto import stage_pb2 as pb
from stagemesh.proto import stage_pb2_grpc
from stagemesh.proto.rpc import channel
from stagemesh.proto.tensor_codec import encode
from support import MeshProcess, child_env, free_port, new_requests_unavailable, stream_broken_by


def test_unreachable_coordinator_is_a_clear_error_without_hang():
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stagemesh.cli",
            "stage-worker",
            "--coordinator",
            f"127.0.0.1:{free_port()}",
            "--connect-timeout",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert proc.returncode != 0
    assert "is unreachable" in proc.stderr
    assert time.monotonic() - start < 30


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tp", "3"], "num_attention_heads=4 is not divisible by tp=3"),
        (["--pp", "5"], "pp=5 exceeds num_hidden_layers=4"),
        (["--ep", "2"], "ep=2 needs a mixture-of-experts checkpoint"),
        (["--pp", "2", "--layers", "0-0,2-3"], "contiguous"),
    ],
)
def test_coordinator_refuses_impossible_plans(checkpoint, args, message):
    result = CliRunner().invoke(main, ["coordinator", "--model", checkpoint("llama"), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_coordinator_refuses_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(main, ["coordinator", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.fixture(scope="module")
def mesh(checkpoint):
    m = MeshProcess(checkpoint("llama"), "--pp", "2", "--dtype", "float64")
    yield m
    m.stop()


def _stage(mesh, index: int):
    """The stage leader's address, the last KV block (the gateway allocates from 0 up) and the epoch."""
    t = cluster_status(mesh.coordinator).topology
    return t.stage_addresses[index], t.kv_blocks - 1, t.pipeline_epoch


def _forward(address: str, steps: list[pb.Step]) -> list[pb.StepResult]:
    with channel(address) as ch:
        return list(stage_pb2_grpc.StageStub(ch).Forward(iter(steps), timeout=30))


def _seq(seq_id: int, start: int, n: int, block: int) -> pb.SeqStep:
    return pb.SeqStep(
        seq_id=seq_id,
        start_pos=start,
        num_tokens=n,
        block_table=[block],
        wants_token=True,
        sampling=pb.SamplingParams(top_p=1.0),
    )


@pytest.mark.parametrize(
    "hidden,message",
    [
        (torch.randn(3, 32, dtype=torch.float64), "hidden states must have shape [3, 64], got [3, 32]"),
        (torch.randn(3, 64, dtype=torch.float32), "hidden states must be float64, got float32"),
    ],
)
def test_wrong_activation_shape_or_dtype_is_invalid_argument(mesh, hidden, message):
    address, block, epoch = _stage(mesh, 1)
    with pytest.raises(grpc.RpcError) as e:
        _forward(address, [pb.Step(step_id=1, epoch=epoch, seqs=[_seq(7, 0, 3, block)], hidden=encode(hidden))])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()
    # The worker keeps serving: a good step on another stream computes a token.
    hidden = encode(torch.randn(3, 64, dtype=torch.float64))
    good = pb.Step(step_id=2, epoch=epoch, seqs=[_seq(8, 0, 3, block)], hidden=hidden)
    (result,) = _forward(address, [good])
    assert [t.seq_id for t in result.tokens] == [8]


def test_step_from_an_old_epoch_is_unavailable(mesh):
    address, block, epoch = _stage(mesh, 0)
    with pytest.raises(grpc.RpcError) as e:
        _forward(address, [pb.Step(step_id=1, epoch=epoch - 1, seqs=[_seq(5, 0, 1, block)], token_ids=[3])])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "topology changed" in e.value.details()


def test_a_stream_from_an_epoch_not_seen_yet_waits_for_its_topology_instead_of_the_old_addresses(mesh):
    """After a takeover the gateway's stream (new epoch) can reach stage 0 before stage 0's topology watch
    does; the next stage's address it knew until then may be the dead worker's. It waits for the stream's
    epoch (here one that never comes: UNAVAILABLE after the wait) rather than forwarding on the old one."""
    address, block, epoch = _stage(mesh, 0)
    with pytest.raises(grpc.RpcError) as e:
        _forward(address, [pb.Step(step_id=1, epoch=epoch + 1, seqs=[_seq(6, 0, 1, block)], token_ids=[3])])
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"stage 1 of pipeline epoch {epoch + 1} is not known here yet" in e.value.details()


def test_unknown_sequence_is_invalid_argument(mesh):
    address, block, epoch = _stage(mesh, 0)
    step = pb.Step(step_id=1, epoch=epoch, seqs=[_seq(99, 5, 1, block)], token_ids=[3])
    with pytest.raises(grpc.RpcError) as e:
        _forward(address, [step])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown sequence 99" in e.value.details()
    with Client(mesh.gateway, timeout=60) as client:
        assert len(client.generate(GenerationParams([5, 9, 23], max_tokens=4, ignore_eos=True)).token_ids) == 4


def test_positions_past_the_models_context_are_invalid_argument(mesh):
    """A step can fit its KV blocks and still run past the model's context (512 positions): refused before
    it runs, and the stage serves on."""
    address, block, epoch = _stage(mesh, 0)
    seq = _seq(12, 0, 513, block)
    seq.block_table[:] = range(block - 32, block + 1)  # 33 blocks of 16: room for 528 positions
    with pytest.raises(grpc.RpcError) as e:
        _forward(address, [pb.Step(step_id=1, epoch=epoch, seqs=[seq], token_ids=[3] * 513)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "positions run to 513, past the model's context of 512" in e.value.details()
    with Client(mesh.gateway, timeout=60) as client:
        assert len(client.generate(GenerationParams([5, 9, 23], max_tokens=4, ignore_eos=True)).token_ids) == 4


def test_a_stalled_coordinator_declares_no_worker_dead(mesh):
    """The coordinator's process stopped for 5 s (SIGSTOP: an overloaded host) while a stream runs: when it
    runs again it does not count its own stall as the workers' silence (before, both stages were declared
    dead, 'no heartbeat for 5.2s'), and the stream finishes."""
    import signal

    from stagemesh.coordinator.client import cluster_events

    coordinator = mesh.child("coordinator")
    with Client(mesh.gateway, timeout=60) as client:
        stream = client.stream(GenerationParams([5, 9, 23], max_tokens=60, ignore_eos=True))
        tokens = list(next(stream).token_ids)
        coordinator.send_signal(signal.SIGSTOP)
        try:
            time.sleep(5)
        finally:
            coordinator.send_signal(signal.SIGCONT)
        for chunk in stream:
            tokens.extend(chunk.token_ids)
    assert len(tokens) == 60
    time.sleep(1)  # a few sweeps after the stall
    events = cluster_events(mesh.coordinator)
    assert not [e for e in events if e["kind"] == "dead"], events
    assert [e for e in events if e["kind"] == "stalled"]
    assert cluster_status(mesh.coordinator).topology.ready


def test_dead_worker_fails_requests_with_unavailable(mesh):
    """Runs last in this module: it kills stage 1."""
    victim = mesh.child("--stage 1")
    stream_broken_by(mesh.gateway, victim)
    assert new_requests_unavailable(mesh.gateway)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any("stage=1 rank=0" in l and "exited" in l for l in mesh.stderr_lines):
        time.sleep(0.2)
    assert any(f"stage-worker stage=1 rank=0 (pid {victim.pid}) exited with code -9" in l for l in mesh.stderr_lines)
    while time.monotonic() < deadline and cluster_status(mesh.coordinator).topology.ready:
        time.sleep(0.2)
    status = cluster_status(mesh.coordinator)
    assert not status.topology.ready and "stage 1 rank 0 is down, no spare" in status.topology.reason


def test_a_dead_tp_peer_fails_requests_with_unavailable_without_hanging(checkpoint):
    """tp=2 on one host: the ranks meet in shared memory; the leader notices the peer's death by its pid."""
    mesh = MeshProcess(checkpoint("llama"), "--tp", "2")
    try:
        stream_broken_by(mesh.gateway, mesh.child("--stage 0", "--tp-rank 1"))
        assert new_requests_unavailable(mesh.gateway)
    finally:
        mesh.stop()


def test_a_launcher_killed_by_sigkill_takes_its_mesh_with_it(checkpoint):
    """`stagemesh up` killed with SIGKILL leaves no process behind: each child asked the kernel for SIGTERM
    when its launcher dies (deploy.launcher.follow_launcher, set in the child itself, not in a preexec_fn)."""
    import psutil

    mesh = MeshProcess(checkpoint("llama"), "--pp", "2")
    children = list(mesh.children)
    assert len(children) == 4  # coordinator, two stage workers, gateway
    mesh.proc.kill()
    mesh.proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, f"still running after the launcher died: {alive}"
