"""One TP rank with the compiled decode: prefill eagerly, decode greedily through the graphs, and write this
rank's decode logits (every rank writes; the test compares the ranks with each other and with eager)."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from stagemesh.models.compiled import CompileOptions
from stagemesh.models.loader import build_model
from stagemesh.models.runner import ModelRunner
from stagemesh.models.tp import ProcessGroupCollectives, TPRank

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compiled_support import decode_logits  # noqa: E402

rank, world, port, model_dir, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
prompts = [[int(t) for t in p.split(",")] for p in sys.argv[6:]]
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
tp = TPRank(rank, world, ProcessGroupCollectives())
model, _ = build_model(model_dir, tp=tp, dtype=torch.float32)
runner = ModelRunner(model, num_blocks=64, block_size=16, compile=CompileOptions.from_env())
runner.compiled.warm_up(tp)
logits, tokens = decode_logits(runner, prompts, steps=8)
assert runner.compiled.stats.compiled_steps == 8, runner.compiled.stats
from safetensors.torch import save_file  # noqa: E402

graphs = torch.tensor(runner.compiled.stats.graphs)  # pieces dynamo compiled: 1 unless something breaks the graph
padded = torch.tensor(runner.compiled.pad_batch1)  # the batch-1 graph this rank chose (ranks must agree)
save_file({"logits": logits.contiguous(), "tokens": tokens, "graphs": graphs, "padded": padded}, f"{out}.{rank}")
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # see tp_logits.py: gloo's threads can abort interpreter teardown
