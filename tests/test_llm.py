"""`from stagemesh import LLM, SamplingParams`: a real local mesh behind a vLLM-shaped offline API. Many prompts
at once give what each gives alone; chat applies the checkpoint's template as transformers does."""

from __future__ import annotations

import json
import shutil

import pytest
from stagemesh import LLM, SamplingParams

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_with_template(checkpoint, tmp_path_factory):
    """The tiny random Llama with a ChatML template added to its tokenizer_config.json."""
    out = tmp_path_factory.mktemp("tiny-chat") / "llama"
    shutil.copytree(checkpoint("llama"), out)
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) | {"chat_template": CHATML}
    config_file.write_text(json.dumps(config))
    return str(out)


@pytest.fixture(scope="module")
def llm(tiny_with_template):
    with LLM(tiny_with_template, tensor_parallel_size=2, pipeline_parallel_size=2, dtype="float64", threads=1) as llm:
        yield llm
    assert all(c.proc.poll() is not None for c in llm._mesh.children)  # closed: every process is gone


def test_generate_20_prompts_at_once_equals_each_alone(llm):
    prompts = [f"prompt number {i}: " + "word " * (i % 7) for i in range(20)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    together = llm.generate(prompts, params, use_tqdm=True)
    alone = [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
    assert [o.prompt for o in together] == prompts
    for a, b in zip(together, alone):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids and len(a.outputs[0].token_ids) == 8
        assert a.outputs[0].text == b.outputs[0].text and a.prompt_token_ids == b.prompt_token_ids
        assert a.finished and a.outputs[0].finish_reason == "length"


def test_sampling_n_seed_and_logprobs(llm):
    params = SamplingParams(n=2, max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, logprobs=2)
    (first,) = llm.generate({"prompt_token_ids": [5, 9, 23]}, params)
    (again,) = llm.generate({"prompt_token_ids": [5, 9, 23]}, params)
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert first.outputs[0].token_ids != first.outputs[1].token_ids
    assert [o.index for o in first.outputs] == [0, 1] and first.prompt_token_ids == [5, 9, 23]
    assert all(len(lp) >= 2 and tok in lp for o in first.outputs for tok, lp in zip(o.token_ids, o.logprobs))


def test_chat_applies_the_template(llm, tiny_with_template):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    tokenizer = AutoTokenizer.from_pretrained(tiny_with_template)
    assert out.prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert out.prompt_token_ids == list(expected_ids)
    assert len(out.outputs[0].token_ids) == 4
