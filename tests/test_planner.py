"""`coordctl plan`: the worked examples of docs/planning.md come out of the tool, its parameter counts match
published sizes, transformers and what running workers load, and bad input is refused with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner
from stagemesh.coordinator.cli import main as coordctl
from stagemesh.coordinator.model_presets import GPT3_175B, preset, resolve_model
from stagemesh.coordinator.model_shape import ModelShape, shard
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import ParallelPlan
from stagemesh.models.presets import hf_config

GB = 1e9


def run_plan(*args: str) -> dict:
    result = CliRunner().invoke(coordctl, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def layout(report: dict, tp: int, pp: int, ep: int = 0) -> dict:
    return next(e for e in report["layouts"] if (e["tp"], e["pp"], e["ep"]) == (tp, pp, ep))


def gpt_layer(h: int) -> int:
    """A GPT-3 layer by hand: qkv 3h^2 + 3h, proj h^2 + h, fc1 4h^2 + 4h, fc2 4h^2 + h, two LayerNorms 4h."""
    return 12 * h * h + 13 * h


# ---- parameter counts ----


@pytest.mark.parametrize(
    "name,params",
    [
        ("Llama-2-7B", 6_738_415_616),
        ("Llama-2-13B", 13_015_864_320),
        ("Llama-2-70B", 68_976_648_192),
        ("Llama-3-405B", 405_853_388_800),
        ("Mixtral-8x7B", 46_702_792_704),
        ("Mixtral-8x22B", 140_630_071_296),
    ],
)
def test_presets_hold_their_published_parameter_counts(name, params):
    assert preset(name).total_params == params


def test_gpt3_count_by_hand():
    h = 12288
    assert GPT3_175B.total_params == 96 * gpt_layer(h) + 50257 * h + 2048 * h + 2 * h == 174_604_259_328


def test_gpt_formula_matches_transformers():
    """The non-served formula (GELU MLP, biases, learned positions, tied head) against a real GPT-2 module."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=500, n_positions=96)
    model = GPT2LMHeadModel(config)
    shape = dataclasses.replace(
        GPT3_175B,
        name="gpt2-mini",
        layers=3,
        hidden=64,
        heads=4,
        kv_heads=4,
        head_dim=16,
        intermediate=256,
        vocab=500,
        max_context=96,
    )
    assert shape.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tp,pp,tied", [(1, 1, False), (2, 1, True), (4, 2, False), (2, 3, True), (4, 1, True)])
def test_gpt_formula_equals_parallel_plan_on_a_served_shape(tp, pp, tied):
    """Both counting paths agree where both apply (tp=4 > 2 KV heads replicates them)."""
    config = dataclasses.replace(ModelConfig.from_hf_dict(hf_config("llama", "tiny")), tie_word_embeddings=tied)
    served = ModelShape.from_config(config, "llama")
    formula = dataclasses.replace(served, config=None)
    assert shard(formula, tp, pp).stage_params == shard(served, tp, pp).stage_params
    plan = ParallelPlan.build(config, tp, pp)
    assert shard(served, tp, pp).stage_params[0][0] == plan.stage_param_count(config, 0, 0)


# ---- the worked examples of docs/planning.md ----


def test_175b_on_8_gpus_holds_43_75_gb_per_gpu_in_every_layout():
    report = run_plan("--model", "175B", "--gpus", "8", "--gpu-memory", "80GB", "--dtype", "fp16")
    assert report["model"]["weights_bytes"] == pytest.approx(350 * GB)
    for tp, pp in [(8, 1), (1, 8), (2, 4), (4, 2)]:
        assert layout(report, tp, pp)["weights_even"] == pytest.approx(43.75 * GB)
    # The fullest GPU holds more: pp=8's first stage has 12 layers plus the embedding and position tables.
    h, scale = 12288, 175e9 / GPT3_175B.total_params
    first_stage = (12 * gpt_layer(h) + 50257 * h + 2048 * h) * scale * 2
    assert layout(report, 1, 8)["weights_max"] == pytest.approx(first_stage)
    assert layout(report, 1, 8)["weights_max"] / GB == pytest.approx(44.88, abs=0.01)


def test_gpt3_preset_is_0_1_gb_per_gpu_lighter():
    report = run_plan("--model", "GPT-3-175B", "--gpus", "8", "--gpu-memory", "80GB", "--dtype", "fp16")
    assert report["model"]["params"] == 174_604_259_328
    for tp, pp in [(8, 1), (1, 8), (2, 4)]:
        assert layout(report, tp, pp)["weights_even"] / GB == pytest.approx(43.65, abs=0.005)


def test_tensor_parallelism_costs_two_all_reduces_per_layer_whatever_the_degree():
    report = run_plan("--model", "GPT-3-175B", "--gpus", "8", "--gpu-memory", "80GB", "--dtype", "fp16")
    activation = 12288 * 2  # bytes of one token's hidden state
    for tp, pp in [(8, 1), (4, 2), (2, 4)]:
        e = layout(report, tp, pp)
        assert e["allreduces_per_token"] == 2 * 96
        assert e["allreduce_bytes_per_token"] == pytest.approx(192 * 2 * (tp - 1) / tp * activation)
    assert layout(report, 1, 8)["allreduces_per_token"] == 0
    assert report["recommended"]["tp"] == 8  # on one NVLink node, not the guide's tp=2 x pp=4
    assert layout(report, 2, 4)["latency_s"] > 3 * layout(report, 8, 1)["latency_s"]


def test_405b_on_16_gpus_keeps_tp_inside_a_node():
    report = run_plan("--model", "405B", "--gpus", "16", "--gpu-memory", "80GB")
    assert (report["recommended"]["tp"], report["recommended"]["pp"]) == (8, 2)
    assert layout(report, 8, 2)["weights_even"] == pytest.approx(405e9 * 2 / 16)
    refused = {(i["tp"], i["pp"]): i["reason"] for i in report["infeasible"]}
    assert "spans nodes of 8 GPUs" in refused[(16, 1)]
    wide = run_plan("--model", "405B", "--gpus", "16", "--gpu-memory", "80GB", "--allow-cross-node-tp")
    tp16 = layout(wide, 16, 1)  # estimated now: its 252 all-reduces cross the network
    assert tp16["breakdown"]["tp"] > tp16["breakdown"]["weights"]
    assert tp16["latency_s"] > layout(wide, 8, 2)["latency_s"]
    slower = run_plan(
        "--model", "405B", "--gpus", "16", "--gpu-memory", "80GB", "--allow-cross-node-tp", "--inter-bw", "10GB/s"
    )
    assert layout(slower, 16, 1)["latency_s"] > tp16["latency_s"]
    assert layout(slower, 8, 2)["latency_s"] == pytest.approx(layout(wide, 8, 2)["latency_s"], rel=1e-3)


def test_70b_tp2_against_tp4_at_100_gb_per_s():
    report = run_plan("--model", "70B", "--gpus", "4", "--gpu-memory", "80GB", "--intra-bw", "100GB/s")
    tp4, tp2 = layout(report, 4, 1), layout(report, 2, 2)
    assert tp4["latency_s"] < tp2["latency_s"]
    assert report["recommended"]["tp"] == 4
    assert tp4["allreduce_bytes_per_token"] == 160 * 1.5 * 8192 * 2 == 3_932_160
    assert tp2["allreduce_bytes_per_token"] == 160 * 1.0 * 8192 * 2
    alone = run_plan("--model", "70B", "--gpus", "2", "--gpu-memory", "80GB", "--intra-bw", "100GB/s")
    assert layout(alone, 2, 1)["latency_s"] > tp4["latency_s"]


@pytest.mark.parametrize("tp,gb", [(2, 70.0), (4, 35.0), (8, 17.5)])
def test_memory_of_a_70b_model(tp, gb):
    report = run_plan("--model", "70B", "--gpus", str(tp), "--gpu-memory", "80GB", "--dtype", "fp16")
    assert layout(report, tp, 1)["weights_even"] == pytest.approx(gb * GB)
    llama = run_plan("--model", "Llama-2-70B", "--gpus", str(tp), "--gpu-memory", "80GB", "--dtype", "fp16")
    assert layout(llama, tp, 1)["weights_even"] == pytest.approx(68_976_648_192 * 2 / tp)


def test_expert_parallelism_exchanges_twice_per_moe_layer():
    report = run_plan("--model", "Mixtral-8x7B", "--gpus", "4", "--gpu-memory", "80GB")
    e = layout(report, 1, 2, 2)
    assert e["all_to_all_per_token"] == 2 * 32
    owners = 2 * (1 - math.comb(4, 2) / math.comb(8, 2))  # expert workers one token's top-2 reaches
    assert e["all_to_all_bytes_per_token"] == pytest.approx(64 * owners * 4096 * 2)
    assert e["weights_max"] == pytest.approx(4 * 32 * 3 * 4096 * 14336 * 2)  # an expert worker: 4 experts x 32 layers
    assert layout(report, 4, 1)["all_to_all_per_token"] == 0
    assert report["recommended"]["ep"] == 0  # 64 gRPC round trips cost more than the experts they spare
    six = run_plan("--model", "Mixtral-8x22B", "--gpus", "6", "--gpu-memory", "80GB", "--batch", "32")
    assert six["recommended"]["ep"] == 4  # no tp x pp grid suits 6 GPUs and 8 KV heads as well
    assert six["recommended"]["throughput"] > layout(six, 2, 3)["throughput"]


def test_the_planner_warns_when_experts_cost_less_than_their_round_trip():
    """Mixtral-8x7B's expert layer on a slow memory bus (100 GB/s) costs more than a 200 us round trip at
    batch 1; on a fast one (10 TB/s) it costs less at batch 1 and pays from some larger batch."""
    slow = run_plan("--model", "Mixtral-8x7B", "--gpus", "4", "--gpu-memory", "80GB", "--hbm-bandwidth", "100GB/s")
    assert layout(slow, 1, 2, 2)["warnings"] == []
    fast = run_plan("--model", "Mixtral-8x7B", "--gpus", "4", "--gpu-memory", "80GB", "--hbm-bandwidth", "100TB/s")
    (warning,) = layout(fast, 1, 2, 2)["warnings"]
    assert "less than its dispatch round trip" in warning
    assert layout(fast, 4, 1)["warnings"] == []  # no expert workers, nothing to warn about
    tokens = int(warning.split("EP pays from about ")[1].split()[0]) if "pays from" in warning else None
    assert tokens is None or tokens > 1


# ---- the model's behaviour ----


def test_one_gpu_latency_by_hand():
    """Llama-2-7B on one GPU: weights less the embedding table streamed, KV read, two gateway messages."""
    report = run_plan("--model", "Llama-2-7B", "--gpus", "1", "--gpu-memory", "80GB", "--context", "1000")
    e, a = report["layouts"][0], report["assumptions"]
    streamed = (6_738_415_616 - 32000 * 4096) * 2
    kv = 1000 * 32 * 2 * 4096 * 2
    assert e["latency_s"] == pytest.approx((streamed + kv) / 3.35e12 + 2 * a["message_s"])
    assert e["kv_tokens"] == math.floor((72e9 - 6_738_415_616 * 2) / (32 * 2 * 4096 * 2))


def test_micro_batches_fill_the_pipeline_and_kv_caps_the_batch():
    one = layout(run_plan("--model", "70B", "--gpus", "4", "--gpu-memory", "80GB"), 1, 4)
    many = layout(run_plan("--model", "70B", "--gpus", "4", "--gpu-memory", "80GB", "--batch", "8"), 1, 4)
    assert many["micro_batches"] == 4 and many["throughput"] > 3 * one["throughput"]
    capped = layout(run_plan("--model", "70B", "--gpus", "2", "--gpu-memory", "80GB", "--batch", "64"), 2, 1)
    assert capped["batch"] == capped["kv_sequences"] < 64


def test_the_objective_picks_the_recommendation():
    for objective, key in (("latency", "latency_s"), ("throughput", "throughput")):
        report = run_plan(
            "--model", "Mixtral-8x22B", "--gpus", "8", "--gpu-memory", "80GB", "--batch", "48", "--optimize", objective
        )
        best = (min if objective == "latency" else max)(e[key] for e in report["layouts"])
        assert report["recommended"][key] == best and report["objective"] == objective


def test_table_output_names_the_recommendation_and_the_refusals():
    result = CliRunner().invoke(coordctl, ["plan", "--model", "405B", "--gpus", "16", "--gpu-memory", "80GB"])
    assert result.exit_code == 0, result.output
    assert "recommended: tp=8 pp=2" in result.output and "cannot run tp=16 pp=1" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "Llama-9-1T", "--gpus", "8", "--gpu-memory", "80GB"], "unknown model 'Llama-9-1T'"),
        (["--model", "70B", "--gpus", "8", "--gpu-memory", "80 gigs"], "--gpu-memory '80 gigs' does not parse"),
        (
            ["--model", "70B", "--gpus", "8", "--gpu-memory", "80GB", "--hbm-bandwidth", "fast"],
            "--hbm-bandwidth 'fast'",
        ),
        (["--model", "70B", "--gpus", "8", "--gpu-memory", "80GB", "--inter-bw", "100GB"], "--inter-bw '100GB'"),
        (["--model", "70B", "--gpus", "0", "--gpu-memory", "80GB"], "--gpus must be at least 1"),
        (["--model", "GPT-3-175B", "--gpus", "97", "--gpu-memory", "80GB"], "no layout of GPT-3-175B can use 97 GPU"),
        (["--model", "70B", "--gpus", "1", "--gpu-memory", "80GB"], "needs 140.00 GB of weights > 72.00 GB usable"),
        (["--model", "GPT-3-175B", "--gpus", "8", "--gpu-memory", "80GB", "--context", "4096"], "--context 4096"),
        (["--model", "70B", "--gpus", "8"], "--gpu-memory"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = CliRunner().invoke(coordctl, ["plan", *args])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1


def test_a_checkpoint_directory_is_read_from_its_config(checkpoint):
    shape = resolve_model(checkpoint("qwen2"))
    assert (
        shape.config is not None
        and shape.tied
        and shape.total_params == ParallelPlan.build(shape.config).stage_param_count(shape.config, 0, 0)
    )


# ---- against a running mesh ----


# Against the shared float64 meshes of conftest (llama_mesh, mixtral_mesh): layout name, expected (tp, pp, ep).
@pytest.mark.parametrize("llama_mesh,layout", [("tp1-pp2", (1, 2, 0)), ("tp2-pp2", (2, 2, 0))], indirect=["llama_mesh"])
def test_predicted_parameter_memory_is_within_5_percent_of_what_workers_load(llama_mesh, layout):
    _predicted_within_5_percent(llama_mesh, *layout)


@pytest.mark.parametrize("mixtral_mesh,layout", [("tp1-pp2-ep2", (1, 2, 2))], indirect=["mixtral_mesh"])
def test_predicted_moe_parameter_memory_is_within_5_percent_of_what_workers_load(mixtral_mesh, layout):
    _predicted_within_5_percent(mixtral_mesh, *layout)


def _predicted_within_5_percent(running, tp: int, pp: int, ep: int) -> None:
    report = run_plan("--from-cluster", running.coordinator)
    workers = report["cluster"]["workers"]
    assert report["cluster"]["layout"] == {"tp": tp, "pp": pp, "ep": ep} and len(workers) == tp * pp + ep
    assert report["hardware"]["gpus"] == tp * pp + ep
    for w in workers:
        assert w["measured_param_bytes"] > 0
        assert abs(w["predicted_param_bytes"] / w["measured_param_bytes"] - 1) < 0.05, w
    assert sum(w["kind"] == "expert" for w in workers) == ep
    status = CliRunner().invoke(coordctl, ["status", "--coordinator", running.coordinator, "--json"])
    for w in json.loads(status.output)["workers"]:
        assert abs(w["predicted_param_bytes"] / w["param_bytes"] - 1) < 0.05
    table = CliRunner().invoke(coordctl, ["plan", "--from-cluster", running.coordinator])
    assert table.exit_code == 0 and "parameter memory per worker" in table.output
