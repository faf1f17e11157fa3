"""`stagemesh demo`: the README's main job. Starts the local mesh on a checkpoint, shows `coordctl status`,
streams a few requests at once through the public API, and stops everything."""

from __future__ import annotations

import asyncio
import sys
import time

from rich.console import Console
from stagemesh.coordinator.client import cluster_status
from stagemesh.coordinator.status import render, status_dict
from stagemesh.deploy.commands import MeshLayout
from stagemesh.deploy.launcher import LocalMesh
from stagemesh.gateway.client import AsyncClient, GenerationParams

PROMPTS = ("The mesh splits a model", "Pipeline stages pass activations", "Tensor parallel ranks share")


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
        tokens = asyncio.run(_stream(mesh.gateway, PROMPTS, max_tokens, console))
        console.print(f"\n{tokens} tokens from {len(PROMPTS)} concurrent streams in {time.monotonic() - start:.1f} s")
    finally:
        mesh.stop()
