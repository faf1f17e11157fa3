"""The parallel plan refuses impossible layouts with the number that does not fit."""

from __future__ import annotations

import dataclasses

import pytest
from stagemesh.errors import PlanError
from stagemesh.models.config import ModelConfig
from stagemesh.models.plan import ParallelPlan, kv_head_range, place_experts
from stagemesh.models.presets import hf_config

LLAMA = ModelConfig.from_hf_dict(hf_config("llama", "tiny"))  # 4 layers, 4 heads, 2 KV heads, I=128
MIXTRAL = ModelConfig.from_hf_dict(hf_config("mixtral", "tiny"))  # 8 experts


def test_even_split_and_explicit_ranges():
    plan = ParallelPlan.build(LLAMA, tp=2, pp=3)
    assert [(s.first_layer, s.end_layer) for s in plan.stages] == [(0, 2), (2, 3), (3, 4)]
    assert plan.stages[0].has_embedding and plan.stages[-1].has_head and not plan.stages[1].has_head
    plan = ParallelPlan.build(LLAMA, pp=3, layers="0-0,1-2,3-3")
    assert [(s.first_layer, s.end_layer) for s in plan.stages] == [(0, 1), (1, 3), (3, 4)]
    assert plan.describe() == "tp=1 pp=3 layers=0-0,1-2,3-3"


def test_balanced_split_gives_the_head_stage_fewer_layers():
    bench = ModelConfig.from_hf_dict(hf_config("llama", "bench"))  # the LM head weighs ~2.8 layers
    plan = ParallelPlan.build(bench, pp=2, layers="balanced")
    assert [(s.first_layer, s.end_layer) for s in plan.stages] == [(0, 9), (9, 16)]
    assert ParallelPlan.build(LLAMA, pp=2, layers="balanced").stages == ParallelPlan.build(LLAMA, pp=2).stages


@pytest.mark.parametrize(
    "config,kwargs,message",
    [
        (LLAMA, dict(tp=3), "num_attention_heads=4 is not divisible by tp=3"),
        (
            dataclasses.replace(LLAMA, num_attention_heads=6, num_key_value_heads=6),
            dict(tp=4),
            "num_attention_heads=6 is not divisible by tp=4",
        ),
        (
            dataclasses.replace(LLAMA, num_attention_heads=12, num_key_value_heads=3),
            dict(tp=4),
            "tp=4 is not a multiple of num_key_value_heads=3",
        ),
        (
            dataclasses.replace(LLAMA, intermediate_size=130),
            dict(tp=4),
            "intermediate_size=130 is not divisible by tp=4",
        ),
        (LLAMA, dict(pp=5), "pp=5 exceeds num_hidden_layers=4"),
        (LLAMA, dict(ep=2), "ep=2 needs a mixture-of-experts checkpoint"),
        (MIXTRAL, dict(ep=9), "ep=9 exceeds num_local_experts=8"),
        (LLAMA, dict(pp=2, layers="0-2,2-3"), "contiguous"),
        (LLAMA, dict(pp=2, layers="0-1,2-2"), "covers 3 layers; the model has 4"),
        (LLAMA, dict(pp=2, layers="0-3"), "gives 1 ranges for pp=2"),
        (LLAMA, dict(pp=2, layers="a-b,c"), "not a range"),
        (LLAMA, dict(tp=0), "degrees must be positive"),
    ],
)
def test_impossible_layouts_are_refused(config, kwargs, message):
    with pytest.raises(PlanError, match=message):
        ParallelPlan.build(config, **kwargs)


def test_kv_heads_are_replicated_when_tp_exceeds_them():
    assert [kv_head_range(LLAMA, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [kv_head_range(LLAMA, 2, r) for r in range(2)] == [(0, 1), (1, 2)]


def test_expert_placement():
    assert place_experts(8, 3, "contiguous", {}) == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert place_experts(8, 3, "round-robin", {}) == ((0, 3, 6), (1, 4, 7), (2, 5))
    assert place_experts(4, 2, "contiguous", {0: 2}) == ((0, 1), (0, 2, 3))
    plan = ParallelPlan.build(MIXTRAL, ep=3, replicas="all=2")
    assert all(len(plan.expert_owners(e)) == 2 for e in range(8))
    with pytest.raises(PlanError, match="needs ep >= 3"):
        ParallelPlan.build(MIXTRAL, ep=2, replicas="1=3")


def test_param_count_formula_adds_up():
    """Summed over ranks, a sharded stage holds the whole model plus (tp - 1) copies of what is replicated."""
    for config in (LLAMA, MIXTRAL):
        one = ParallelPlan.build(config)
        whole = one.stage_param_count(config, 0, 0)
        plan = ParallelPlan.build(config, tp=2, pp=2)
        total = sum(plan.stage_param_count(config, s.index, r) for s in plan.stages for r in range(2))
        replicated = sum(plan.replicated_param_count(config, s.index) for s in plan.stages)
        assert total == whole + replicated
