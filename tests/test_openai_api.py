"""The OpenAI-compatible HTTP API, driven by the official `openai` client against `stagemesh up --http-port 0`:
completions and chat, streamed and not, n with a seed, stop, usage, logprobs, the same text as the gRPC API,
typed errors, and a client that goes away frees its KV."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from click.testing import CliRunner
from openai import OpenAI
from stagemesh.coordinator.cli import main as coordctl
from stagemesh.gateway.client import Client, GenerationParams
from support import MeshProcess


@pytest.fixture(scope="module")
def api(smollm2_mesh) -> OpenAI:
    return OpenAI(base_url=f"http://{smollm2_mesh.http}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(api) -> str:
    return api.models.list().data[0].id


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_health_metrics_tokenize(smollm2_mesh, api, model, smollm2):
    (card,) = api.models.list().data
    assert card.id == smollm2 and card.owned_by == "stagemesh"
    base = f"http://{smollm2_mesh.http}"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    assert "stagemesh_generation_tokens_total" in httpx.get(f"{base}/metrics", timeout=10).text
    tokens = httpx.post(f"{base}/tokenize", json={"prompt": "Hello world"}, timeout=10).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}, timeout=10).json()["prompt"]
    assert text == "Hello world"


def test_completion_text_equals_the_grpc_api_streamed_or_not(smollm2_mesh, api, model):
    request = dict(model=model, prompt="The capital of France is", max_tokens=10, temperature=0.8, seed=7)
    request["extra_body"] = {"ignore_eos": True}  # vLLM's extra, sent as the openai client sends extras
    whole = api.completions.create(**request)
    chunks = list(api.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    with Client(smollm2_mesh.gateway, timeout=120) as client:
        grpc = client.generate(
            GenerationParams("The capital of France is", max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
        )
    assert whole.choices[0].text == streamed == grpc.text
    assert whole.choices[0].finish_reason == grpc.finish_reason == "length"
    token_chunks = [c for c in chunks if c.choices and c.choices[0].finish_reason is None]
    assert chunks[-1].usage.completion_tokens == len(token_chunks) == len(grpc.token_ids) == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == grpc.usage.prompt_tokens


def test_chat_streamed_and_not(api, model):
    whole = api.chat.completions.create(model=model, messages=CHAT, temperature=0, max_tokens=20)
    assert "Paris" in whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(
        api.chat.completions.create(
            model=model,
            messages=CHAT,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    content_chunks = [c for c in chunks[1:] if c.choices and c.choices[0].finish_reason is None]
    assert len(content_chunks) == chunks[-1].usage.completion_tokens  # one chunk per token streamed


def test_n_samples_with_a_seed_reproduce_and_differ(api, model):
    request = dict(model=model, prompt="My favourite animal is", max_tokens=6, n=2, seed=11, temperature=1.0)
    request["extra_body"] = {"ignore_eos": True}
    first, again = api.completions.create(**request), api.completions.create(**request)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert texts[0] != texts[1]
    assert first.usage.completion_tokens == 12
    streamed = {0: "", 1: ""}
    for chunk in api.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == texts


def test_stop_strings_cut_the_text(api, model):
    request = dict(model=model, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    free = api.completions.create(**request)
    stop = free.choices[0].text[3:5]
    cut = api.completions.create(**request, stop=[stop, "zzz"])
    assert cut.choices[0].text == free.choices[0].text[: free.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs(api, model):
    chat = api.chat.completions.create(
        model=model, messages=CHAT, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-9
        assert entry.token == entry.top_logprobs[0].token  # greedy: the chosen token is the most likely
    assert "".join(e.token for e in content).startswith(chat.choices[0].message.content[:3])
    legacy = api.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2
    )
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == legacy.choices[0].text and lp.text_offset[0] == 0


@pytest.mark.parametrize(
    "request_fields,message",
    [
        (dict(prompt="Hi", temperature=-1), "temperature must be >= 0"),
        (dict(prompt="Hi", max_tokens=0), "max_tokens must be >= 1"),
        (dict(prompt="Hi", top_p=0), "top_p must be in (0, 1]"),
        (dict(prompt="Hi", n=0), "n:"),
        (dict(prompt="Hi", logprobs=50), "logprobs:"),
        (dict(prompt=[5, 999999]), "token ids must be in [0, 49152)"),
        (dict(prompt="Hi", max_tokens=100000), "exceeds the context"),
        (dict(prompt="Hi", max_tokens=4, extra_body={"min_tokens": 9}), "min_tokens must be in [0, max_tokens=4]"),
        (dict(prompt="Hi", stop=["x" * 300]), "stop: at most 16 strings"),
    ],
)
def test_bad_requests_are_400_and_disturb_nothing(api, model, request_fields, message):
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model=model, **request_fields)
    assert message in str(e.value)
    assert api.completions.create(model=model, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_unknown_model_is_404_and_bad_chat_is_400(api, model):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        api.completions.create(model="no-such-model", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=model, messages=[{"content": "no role"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="chat template refused"):  # content None: the template fails
        api.chat.completions.create(model=model, messages=[{"role": "user", "content": None}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=2, top_logprobs=2)


def _kv_used(coordinator: str) -> tuple[int, list[int]]:
    data = json.loads(CliRunner().invoke(coordctl, ["status", "--coordinator", coordinator, "--json"]).output)
    return data["gateway"]["kv_blocks_used"], [w["kv_blocks_used"] for w in data["workers"]]


def _wait_kv_free(coordinator: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (used := _kv_used(coordinator)) != (0, [0] * len(used[1])):
        assert time.monotonic() < deadline, f"KV still in use: {used}"
        time.sleep(0.2)


def _metric(mesh, series: str) -> float:
    body = httpx.get(f"http://{mesh.http}/metrics", timeout=10).text
    return next((float(l.split()[-1]) for l in body.splitlines() if l.startswith(series + " ")), 0.0)


CANCELLED = 'stagemesh_requests_total{finish_reason="cancelled"}'


def test_disconnecting_mid_stream_frees_the_kv(smollm2_mesh, model):
    before = _metric(smollm2_mesh, CANCELLED)
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"http://{smollm2_mesh.http}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith("data: ")) >= 3
            deadline = time.monotonic() + 15
            while _kv_used(smollm2_mesh.coordinator)[0] == 0:  # coordctl sees it running, holding KV
                assert time.monotonic() < deadline
                time.sleep(0.2)
        # leaving the block closes the connection mid-stream
    _wait_kv_free(smollm2_mesh.coordinator)
    assert _metric(smollm2_mesh, "stagemesh_kv_cache_blocks_used") == 0
    assert _metric(smollm2_mesh, CANCELLED) == before + 1  # ended by the disconnect, not by finishing


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(smollm2_mesh, model):
    before = _metric(smollm2_mesh, CANCELLED)
    body = {"model": model, "prompt": "Tell me a long story.", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"http://{smollm2_mesh.http}/v1/completions", json=body, timeout=2.0)
    _wait_kv_free(smollm2_mesh.coordinator)
    assert _metric(smollm2_mesh, CANCELLED) == before + 1


# ---- a second, tiny mesh: a client token, one request at a time, no chat template ----


@pytest.fixture(scope="module")
def guarded(checkpoint):
    mesh = MeshProcess(
        checkpoint("llama"),
        "--http-port",
        "0",
        "--max-running",
        "1",
        "--max-queue",
        "1",
        "--client-token",
        "s3cret",
    )
    yield mesh
    mesh.stop()


def test_bearer_token_rate_limit_and_missing_template(guarded):
    base = f"http://{guarded.http}/v1"
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    api = OpenAI(base_url=base, api_key="s3cret", timeout=60, max_retries=0)
    model = api.models.list().data[0].id
    assert httpx.get(f"http://{guarded.http}/health", timeout=10).status_code == 200  # open, as grpc health is
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        api.chat.completions.create(model=model, messages=CHAT, max_tokens=2)
    assert api.completions.create(model=model, prompt=[5, 9, 23], max_tokens=3).usage.completion_tokens == 3

    running = api.completions.create(
        model=model, prompt=[5, 9], max_tokens=500, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(running))
    queued: list = []
    waiter = threading.Thread(
        target=lambda: queued.append(api.completions.create(model=model, prompt=[5], max_tokens=2))
    )
    waiter.start()
    deadline = time.monotonic() + 20
    while "stagemesh_num_requests_waiting 1.0" not in httpx.get(f"http://{guarded.http}/metrics", timeout=10).text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        api.completions.create(model=model, prompt=[1, 2], max_tokens=2)
    running.close()
    waiter.join(60)
    assert queued and queued[0].usage.completion_tokens == 2
