"""One TP rank: builds its shard of a checkpoint, joins a gloo group, writes the prompt logits (rank 0)."""

import datetime
import os
import sys

import torch
import torch.distributed as dist
from stagemesh.models.batch import SeqChunk
from stagemesh.models.loader import build_model
from stagemesh.models.runner import ModelRunner
from stagemesh.models.tp import ProcessGroupCollectives, TPRank

rank, world, port, model_dir, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
prompts = [[int(t) for t in p.split(",")] for p in sys.argv[6:]]
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
model, reader = build_model(model_dir, tp=TPRank(rank, world, ProcessGroupCollectives()), dtype=torch.float64)
runner = ModelRunner(model, num_blocks=64, block_size=16)
chunks, next_block = [], 0
for i, p in enumerate(prompts):
    blocks = -(-len(p) // 16)
    chunks.append(SeqChunk(i, 0, len(p), tuple(range(next_block, next_block + blocks))))
    next_block += blocks
ids = torch.tensor([t for p in prompts for t in p])
logits = runner.run(chunks, input_ids=ids, all_logits=True)
if rank == 0:
    from safetensors.torch import save_file

    save_file({"logits": logits.contiguous()}, out)
dist.barrier()
dist.destroy_process_group()
# Gloo's worker threads can abort interpreter teardown ("terminate called without an active exception",
# pytorch/pytorch#190489): leave without it once the work is done.
os._exit(0)
