"""`stagemesh demo`: the README's main job. Starts the local mesh on a checkpoint, shows `coordctl status`,
then a short chat streamed through the public API when the checkpoint has a chat template (the converted
SmolLM2 of `make demo`), or a few requests at once when it has none (random-weight checkpoints), and stops
everything."""

from __future__ import annotations

import asyncio
import sys
import time

from rich.console import Console
from stagemesh.coordinator.client import cluster_status
from stagemesh.coordinator.status import render, status_dict
from stagemesh.deploy.commands import MeshLayout
from stagemesh.deploy.launcher import LocalMesh
from stagemesh.gateway.chat_template import ChatTemplate
from stagemesh.gateway.client import AsyncClient, GenerationParams

PROMPTS = ("The mesh splits a model", "Pipeline stages pass activations", "Tensor parallel ranks share")
QUESTIONS = ("What is the capital of France?", "Name the three primary colors.", "Write a haiku about the sea.")


def _chat(address: str, model_dir: str, max_tokens: int, console: Console) -> int:
    """Each question rendered with the checkpoint's chat template, its answer streamed as it comes (greedy)."""
    from stagemesh.gateway.client import Client
    from stagemesh.gateway.tokenizer import TextCodec

    template, codec = ChatTemplate.from_dir(model_dir), TextCodec.from_dir(model_dir)
    count = 0
    with Client(address, timeout=600) as client:
        for question in QUESTIONS:
            prompt = codec.encode(template.render([{"role": "user", "content": question}]), add_special_tokens=False)
            console.print(f"[bold]user:[/] {question}\n[bold]assistant:[/] ", end="")
            for chunk in client.stream(GenerationParams(prompt, max_tokens=max_tokens, temperature=0)):
                console.print(chunk.text, end="", markup=False, highlight=False)
                count += len(chunk.token_ids)
            console.print("\n")
    return count


async def _stream(address: str, prompts: tuple[str, ...], max_tokens: int, console: Console) -> int:
    async def one(client: AsyncClient, i: int, prompt: str) -> int:
        text, count = "", 0
        async for chunk in client.stream(GenerationParams(prompt, max_tokens=max_tokens, seed=i, temperature=0.8)):
            text += chunk.text
            count += len(chunk.token_ids)
        console.print(f"[bold]{prompt}[/]{text}  [dim]({count} tokens)[/]")
        return count

    async with AsyncClient(address, timeout=600) as client:
        return sum(await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts))))


def run_demo(layout: MeshLayout, max_tokens: int = 32) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    mesh = LocalMesh(layout)
    try:
        console.print(f"starting the mesh: tp={layout.tp} pp={layout.pp} on {layout.model_dir} ...")
        mesh.start()
        console.print(f"ready gateway={mesh.gateway} coordinator={mesh.coordinator}\n")
        render(status_dict(cluster_status(mesh.coordinator)), console)
        console.print()
        start = time.monotonic()
        if ChatTemplate.from_dir(layout.model_dir) is not None:
            tokens = _chat(mesh.gateway, layout.model_dir, max_tokens, console)
            console.print(f"{tokens} tokens for {len(QUESTIONS)} answers in {time.monotonic() - start:.1f} s")
        else:
            tokens = asyncio.run(_stream(mesh.gateway, PROMPTS, max_tokens, console))
            elapsed = time.monotonic() - start
            console.print(f"\n{tokens} tokens from {len(PROMPTS)} concurrent streams in {elapsed:.1f} s")
    finally:
        mesh.stop()
