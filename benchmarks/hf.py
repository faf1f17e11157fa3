"""The Hugging Face `transformers` baseline, run in this process on the same checkpoint: `generate` with
greedy decoding and no end-of-sequence stop, one batch or static batches of left-padded prompts."""

from __future__ import annotations

import time
import warnings

import torch
from stagemesh.benchmarks.meshes import RequestTiming

PAD_ID = 0


def load_hf(path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


class StepClock:
    """A stopping criterion that never stops: it notes when each generated token of the batch exists."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, clock: StepClock | None = None) -> torch.Tensor:
    """Greedy `generate` of one batch: prompts left-padded to one length, exactly max_new_tokens each."""
    from transformers import StoppingCriteriaList

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=PAD_ID,
            stopping_criteria=StoppingCriteriaList([clock] if clock else []),
        )


def hf_static_batches(model, requests: list[tuple[list[int], int]], batch: int) -> list[RequestTiming]:
    """Serves `requests` (prompt, max_tokens), all arrived at once, in order, `batch` at a time; each batch runs
    until its longest request is done (static batching) and returns all its texts then."""
    start, timings = time.perf_counter(), []
    for i in range(0, len(requests), batch):
        group, clock = requests[i : i + batch], StepClock()
        hf_generate(model, [p for p, _ in group], max(n for _, n in group), clock)
        done = time.perf_counter() - start
        timings += [RequestTiming(n, clock.times[0] - start, done, ()) for _, n in group]
    return timings
