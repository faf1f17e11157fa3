"""Sampling: greedy, temperature, top-k, top-p and per-request seeds."""

from __future__ import annotations

import pytest
import torch
from stagemesh.errors import InvalidArgument
from stagemesh.models.engine import ReferenceEngine
from stagemesh.models.requests import GenerationRequest, SamplingParams
from stagemesh.models.sampling import sample

LOGITS = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_greedy_is_argmax_with_logprobs():
    out = sample(LOGITS, [SamplingParams(logprobs=3)] * 4, [0] * 4)
    assert [t.token_id for t in out] == LOGITS.argmax(-1).tolist()
    logprobs = torch.log_softmax(LOGITS, -1)
    assert out[0].logprob == pytest.approx(logprobs[0].max().item())
    assert [i for i, _ in out[0].top_logprobs] == logprobs[0].topk(3).indices.tolist()


def test_same_seed_same_tokens_alone_or_batched():
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = [sample(LOGITS[1:2], [p], [k])[0].token_id for k in range(20)]
    others = [SamplingParams(temperature=0.7, seed=9), SamplingParams(), p, SamplingParams(temperature=2.0)]
    batched = [sample(LOGITS[[0, 2, 1, 3]], others, [k] * 4)[2].token_id for k in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_top_k_and_top_p_narrow_to_greedy():
    greedy = LOGITS.argmax(-1).tolist()
    for params in (
        SamplingParams(temperature=1.0, top_k=1, seed=5),
        SamplingParams(temperature=1.0, top_p=1e-6, seed=5),
    ):
        assert [t.token_id for t in sample(LOGITS, [params] * 4, [3] * 4)] == greedy


def test_top_k_keeps_only_k_tokens():
    seen = {sample(LOGITS[:1], [SamplingParams(temperature=5.0, top_k=3, seed=s)], [0])[0].token_id for s in range(200)}
    assert seen == set(LOGITS[0].topk(3).indices.tolist())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(logprobs=99), "logprobs"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(InvalidArgument, match=field):
        SamplingParams(**kwargs)


def test_engine_seeded_sampling_is_reproducible(checkpoint):
    engine = ReferenceEngine(checkpoint("llama"))
    req = GenerationRequest((5, 9, 23), 12, SamplingParams(temperature=1.0, top_p=0.9, seed=7), ignore_eos=True)
    other = GenerationRequest((1, 2, 3, 4, 5, 6), 12, SamplingParams(temperature=0.5, seed=8), ignore_eos=True)
    alone = engine.generate([req])[0].token_ids
    assert engine.generate([other, req])[1].token_ids == alone
    assert (
        engine.generate(
            [GenerationRequest((5, 9, 23), 12, SamplingParams(temperature=1.0, top_p=0.9, seed=8), ignore_eos=True)]
        )[0].token_ids
        != alone
    )
