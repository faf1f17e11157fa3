"""`stagemesh`: one click group for every service and tool. Commands parse flags and call one function;
heavy imports (torch) happen inside commands so `stagemesh --help` and the light services start fast."""

from __future__ import annotations

import json
import sys

import click

from stagemesh.errors import StagemeshError


class StagemeshGroup(click.Group):
    """Reports a StagemeshError as one line on stderr with exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StagemeshError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)


@click.group(cls=StagemeshGroup)
@click.version_option(package_name="stagemesh")
def main() -> None:
    """stagemesh: serve language models too large for one GPU as a gRPC mesh."""


@main.command("make-checkpoint")
@click.option("--arch", type=click.Choice(["llama", "mistral", "qwen2", "mixtral"]), required=True, help="Architecture.")
@click.option("--preset", type=click.Choice(["tiny", "small", "bench"]), default="tiny", show_default=True,
              help="Size: tiny (tests), small (demos), bench (~250M, benchmarks).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float64"]), default="float32",
              show_default=True, help="Dtype the weights are stored in.")
@click.option("--shards", type=int, default=1, show_default=True,
              help="Number of safetensors files (with model.safetensors.index.json when > 1).")
def make_checkpoint_command(arch, preset, out, seed, dtype, shards) -> None:
    """Write a random-weight checkpoint in Hugging Face layout (config, safetensors, tokenizer)."""
    from stagemesh.models.make_checkpoint import make_checkpoint

    path = make_checkpoint(out, arch, preset, seed=seed, dtype=dtype, shards=shards)
    click.echo(f"wrote {arch} {preset} checkpoint to {path}")


def _ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers like 1,2,3", param_hint="--prompt-ids") from None


@main.command("generate")
@click.option("--model", "model_dir", type=click.Path(), help="Checkpoint directory: run the reference engine in-process.")
@click.option("--gateway", help="HOST:PORT of a running mesh's gateway (instead of --model).")
@click.option("--prompt", help="Prompt text (needs tokenizer.json).")
@click.option("--prompt-ids", help="Prompt as comma-separated token ids.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Tokens to generate at most.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float64"]), default="float32",
              show_default=True, help="Compute dtype (reference engine only; a mesh's is set by `up`).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N] (reference engine only).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Keep the k most likely tokens; 0 = off.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (same seed, same tokens).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait (gateway only).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
def generate_command(model_dir, gateway, prompt, prompt_ids, max_tokens, dtype, device, temperature, top_p,
                     top_k, seed, ignore_eos, timeout, as_json) -> None:
    """Generate from a checkpoint (reference engine) or from a running mesh (--gateway)."""
    from stagemesh.gateway.generate import GenerateArgs, run_generate

    if (model_dir is None) == (gateway is None):
        raise click.UsageError("give exactly one of --model DIR or --gateway HOST:PORT")
    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    args = GenerateArgs(prompt=prompt, prompt_ids=_ids(prompt_ids), max_tokens=max_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos)
    result = run_generate(args, model_dir=model_dir, gateway=gateway, dtype=dtype, device=device, timeout=timeout,
                          on_text=None if as_json else lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"\n[{result['finish_reason']}: {len(result['token_ids'])} tokens]", err=True)


if __name__ == "__main__":
    main()
