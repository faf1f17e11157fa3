"""The benchmark harness cannot rot unseen: `stagemesh bench --suite smoke` runs every case on tiny
checkpoints and must leave every row of the table with numbers, plus results.md and the plots; the GPU
check's script runs its whole flow on CPU with a tiny shape; a short soak with one kill keeps `--suite soak`
honest (no good request fails, no KV block leaks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stagemesh.benchmarks.plots import PLOTS

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "decode_vs_hf",
    "decode_roofline",
    "mesh_decode",
    "ttft",
    "mixed_throughput",
    "tp_latency",
    "pp_throughput",
    "pp_throughput_half",
    "stage_hop",
    "param_bytes",
    "load_rss",
    "moe_decode",
    "expert_ffn",
    "expert_ffn_large",
    "tp_dispatch",
    "tp_latency_compiled",
    "compiled_fp32_b1",
    "compiled_roofline",
    "compiled_fp32_b8",
    "compiled_bf16_b1",
    "compiled_bf16_b8",
    "compiled_mesh_decode",
    "compiled_mixed_throughput",
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.timeout(600)  # the compiled rows compile three times (fp32, bf16, the mesh's stage)
def test_smoke_suite_writes_every_row_with_numbers(tmp_path):
    cmd = [sys.executable, "-m", "stagemesh.cli", "bench", "--suite", "smoke", "--out", "out"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=420)  # compiled rows compile
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    assert set(rows) == ROWS
    for key, r in rows.items():
        assert r["verdict"] in ("pass", "MISS", "info"), (key, r["note"])
        assert _finite(r["value"]) and r["value"] >= 0, key
        assert r["baseline_value"] is None or (_finite(r["baseline_value"]) and r["baseline_value"] > 0), key
        assert r["ratio"] is None or _finite(r["ratio"]), key
        assert r["target"] is not None or key in ("expert_ffn", "tp_dispatch", "tp_latency_compiled"), key
        if r["verdict"] == "MISS":
            assert r["shortfall"], key
    assert (tmp_path / "checkpoints" / "tiny-llama" / "config.json").is_file()  # the default checkpoint was made
    assert {"cpu", "cores", "torch", "date"} <= set(data["machine"])
    table = (out / "results.md").read_text()
    assert all(rows[k]["what"] in table for k in ROWS)
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "ratio" in run.stdout and "smoke suite" in run.stdout


def test_gpu_check_flow_runs_on_cpu(tmp_path):
    # freezing off: the compiled phase then compiles in seconds (the CUDA run never freezes)
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env["STAGEMESH_COMPILE_FREEZING"] = "0"
    cmd = [
        "bash",
        str(ROOT / "benchmarks" / "gpu_check.sh"),
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--tokens",
        "3",
        "--prompt",
        "8",
        "--reps",
        "1",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    for side in ("engine", "compiled", "hf_eager"):
        assert all(_finite(v) and v > 0 for v in result[side].values()), side
    assert set(result["pipeline"]) == {"pp=1", "pp=2"}
    assert result["pipeline"]["pp=2"]["micro_batches"] == 2
    assert "pp=2 (2 processes, 1 GPU)" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.timeout(180)
def test_soak_with_a_kill_fails_no_good_request_and_frees_every_kv_block(tmp_path, checkpoint):
    """A short `--suite soak --chaos` on the tiny Llama (pp=2, one spare): one stage worker is killed while
    streams are mid-way, every good request still matches its failure-free output, every invalid one is
    refused, and afterwards no KV block is held and a new spare waits in the killed worker's place."""
    cmd = [sys.executable, "-m", "stagemesh.cli", "bench", "--suite", "soak", "--model", checkpoint("llama")]
    cmd += ["--minutes", "0.3", "--chaos", "--kill-every", "8", "--clients", "4", "--pool", "8", "--out", "out"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {r["key"]: r for r in data["rows"]}
    good = rows["soak_good_failed"]
    assert good["value"] == 0 and good["detail"]["completed"] > 0, good["detail"]["failures"]
    assert rows["soak_invalid"]["baseline_value"] > 0 and rows["soak_invalid"]["ratio"] == 1.0
    (kill,) = rows["soak_kills"]["detail"]["kills"]
    assert kill["role"].startswith("stage ") and kill["mid_stream"] > 0, kill
    assert _finite(kill["recovery"]) and _finite(rows["soak_recovery_max"]["value"]), kill
    assert rows["soak_kills"]["detail"]["spares_after"] == 1
    kv = rows["soak_kv_after"]["detail"]
    assert kv["peak"]["kv_workers"] > 0 and kv["after"]["kv_workers"] == kv["after"]["kv_gateway"] == 0
    assert "good requests failed" in (tmp_path / "out" / "results.md").read_text()
