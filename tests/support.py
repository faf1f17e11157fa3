"""Helpers for tests: the Hugging Face oracle, free ports, child processes that always get cleaned up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HELPERS = Path(__file__).parent / "helpers"
PROMPTS = [[5, 9, 23, 42, 7], list(range(3, 20)), [(7 * i) % 500 + 3 for i in range(41)]]


def hf_model(path: str, dtype: torch.dtype = torch.float64):
    """Hugging Face transformers on the same files: the oracle every layout is compared with."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = {}
    if AutoConfig.from_pretrained(path).model_type == "mixtral":
        options["experts_implementation"] = "eager"  # the grouped kernel refuses float64
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **options).eval()


@torch.no_grad()
def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def run_ranks(script: str, world: int, args: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Runs helpers/<script> as `world` gloo ranks around a TCPStore this process hosts (no port races)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size=world + 1, is_master=True, wait_for_workers=False)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPERS / script), str(rank), str(world), str(store.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for rank in range(world)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


class MeshProcess:
    """`stagemesh up ...` as a real subprocess: started, waited for, stopped with SIGTERM."""

    def __init__(self, model_dir: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> None:
        import psutil

        self.argv = [
            sys.executable,
            "-m",
            "stagemesh.cli",
            "up",
            "--model",
            model_dir,
            "--threads",
            "1",
            "--kv-memory",
            "8MiB",
            *args,
        ]
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**child_env(), **(env or {})}
        )
        self.stderr_lines: list[str] = []
        import threading

        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = _readline(self.proc, timeout)
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"stagemesh up failed: {line!r}\n{''.join(self.stderr_lines)[-3000:]}")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        self.gateway, self.coordinator = fields["gateway"], fields["coordinator"]
        self.http = fields.get("http")  # with --http-port
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    def child(self, *flags: str):
        """The child process whose command line holds all of `flags` (e.g. "--stage", "1")."""
        for c in self.children:
            cmd = " ".join(c.cmdline())
            if all(f in cmd for f in flags):
                return c
        raise LookupError(flags)

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        return f"(no ready line in {timeout}s)"
    return proc.stdout.readline().strip()


def stream_broken_by(gateway: str, victim, max_tokens: int = 500):
    """Starts a long stream, kills the `victim` process after its first tokens, and returns the error that
    ended the stream, checked to be UNAVAILABLE within 10 seconds (no hang)."""
    import time

    import grpc
    import pytest
    from stagemesh.gateway.client import Client, GatewayError, GenerationParams

    with Client(gateway, timeout=60) as client:
        stream = client.stream(GenerationParams([5, 9, 23], max_tokens=max_tokens, ignore_eos=True))
        next(stream)
        victim.kill()
        start = time.monotonic()
        with pytest.raises(GatewayError) as e:
            for _ in stream:
                pass
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10
    return e.value


def new_requests_unavailable(gateway: str) -> bool:
    """A fresh request after a failure is refused with UNAVAILABLE (with the reason), without hanging."""
    import grpc
    from stagemesh.gateway.client import Client, GatewayError, GenerationParams

    with Client(gateway, timeout=60) as client:
        try:
            client.generate(GenerationParams([1, 2], max_tokens=2), timeout=20)
        except GatewayError as e:
            return e.code == grpc.StatusCode.UNAVAILABLE
    return False


def kv_in_use(coordinator: str) -> tuple[int, list[int]]:
    """(KV blocks the gateway has allocated, blocks of live sequences on each stage worker), from
    `coordctl status --json`."""
    import json

    from click.testing import CliRunner
    from stagemesh.coordinator.cli import main as coordctl

    data = json.loads(CliRunner().invoke(coordctl, ["status", "--coordinator", coordinator, "--json"]).output)
    return data["gateway"]["kv_blocks_used"], [w["kv_blocks_used"] for w in data["workers"] if w["kind"] == "stage"]


def wait_kv_free(coordinator: str, timeout: float = 10.0) -> None:
    """Waits until no KV block is in use anywhere (reports come every second); fails naming what is left."""
    import time

    deadline = time.monotonic() + timeout
    while (used := kv_in_use(coordinator)) != (0, [0] * len(used[1])):
        assert time.monotonic() < deadline, f"KV still in use (gateway, stages): {used}"
        time.sleep(0.2)
