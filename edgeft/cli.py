"""The ``edgeft`` command line. Commands only parse options and call one stage function;
heavy imports happen inside the commands so ``edgeft --help`` stays instant on a device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgeft import __version__
from edgeft.errors import EdgeftError

PathArg = click.Path(path_type=Path)


class _Group(click.Group):
    """Turns EdgeftError into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeftError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="edgeft")
def main() -> None:
    """Export Hugging Face models to ONNX Runtime training bundles; fine-tune them on devices."""


def _csv(_ctx, _param, value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@click.argument("model_dir", type=PathArg)
@click.option("--out", required=True, type=PathArg, help="Bundle directory to write.")
@click.option("--lora-r", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--lora-dropout", default=0.0, show_default=True, type=float)
@click.option("--target-modules", callback=_csv, help="Comma-separated LoRA targets (default: per model type).")
@click.option("--max-seq-len", default=512, show_default=True, type=int)
@click.option("--init-adapter", type=PathArg, help="Start from this PEFT LoRA adapter (its r/alpha/targets win).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
def export(model_dir, out, lora_r, lora_alpha, lora_dropout, target_modules, max_seq_len, init_adapter, overwrite):
    """(host) Export MODEL_DIR (a Hugging Face causal LM) to a training bundle."""
    from edgeft.host.export import ExportConfig, export_bundle

    path = export_bundle(
        ExportConfig(
            model_dir, out, lora_r, lora_alpha, lora_dropout, target_modules, max_seq_len, init_adapter, overwrite
        )
    )
    click.echo(f"bundle: {path}")


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--data", required=True, type=PathArg, help="Training data, JSON Lines.")
@click.option("--out", required=True, type=PathArg, help="Run directory (adapter, checkpoints, summary).")
@click.option("--eval-data", type=PathArg, help="Held-out JSON Lines; eval loss before and after.")
@click.option("--max-steps", type=int, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float)
@click.option("--lr", default=2e-4, show_default=True, type=float)
@click.option("--warmup-steps", default=0, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--max-seq-len", type=int, help="Default: the bundle's.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps (0: never).")
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option("--truncate", is_flag=True, help="Cut over-long samples instead of refusing them.")
@click.option("--threads", type=int, help="Intra-op threads (default: all cores).")
@click.option("--no-progress", is_flag=True)
def train(
    bundle,
    data,
    out,
    eval_data,
    max_steps,
    epochs,
    lr,
    warmup_steps,
    batch_size,
    grad_accum,
    max_seq_len,
    seed,
    save_every,
    resume,
    truncate,
    threads,
    no_progress,
):
    """(device) Fine-tune the bundle's LoRA adapter on local data."""
    from edgeft.device.train import TrainConfig
    from edgeft.device.train import train as run_training

    summary = run_training(
        TrainConfig(
            bundle,
            data,
            out,
            eval_data,
            max_steps,
            epochs,
            lr,
            warmup_steps,
            batch_size,
            grad_accum,
            max_seq_len,
            seed,
            save_every,
            resume,
            truncate,
            threads,
            not no_progress,
        )
    )
    shown = {
        k: summary[k] for k in ("steps", "eval_loss_before", "eval_loss", "tokens_per_second", "peak_rss_mb", "seconds")
    }
    shown["final_loss"] = summary["losses"][-1] if summary["losses"] else None
    click.echo(json.dumps(shown))


@main.command(name="eval")
@click.argument("bundle", type=PathArg)
@click.option("--data", required=True, type=PathArg)
@click.option("--adapter", type=PathArg, help="A PEFT LoRA adapter directory (default: the bundle's initial one).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--max-seq-len", type=int)
@click.option("--truncate", is_flag=True)
@click.option("--threads", type=int)
def eval_(bundle, data, adapter, batch_size, max_seq_len, truncate, threads):
    """(device) Print {"loss", "perplexity"} of the bundle on DATA."""
    from edgeft.device.evaluate import EvalConfig, evaluate

    click.echo(json.dumps(evaluate(EvalConfig(bundle, data, adapter, batch_size, max_seq_len, truncate, threads))))


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--adapter", type=PathArg, help="A PEFT LoRA adapter directory (default: the base model).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user message in the chat template.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0), help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--seed", type=int)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--provider", help="Execution provider, e.g. cpu or cuda (default: the best available).")
@click.option("--threads", type=int)
def generate(bundle, prompt, adapter, chat, max_new_tokens, temperature, top_k, top_p, seed, stop, provider, threads):
    """(device) Stream a completion of --prompt to stdout."""
    from edgeft.device.generate import GenerateConfig
    from edgeft.device.generate import generate as run_generate

    run_generate(
        GenerateConfig(
            bundle,
            prompt,
            adapter,
            chat,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            list(stop),
            provider,
            threads,
        )
    )


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--adapter", required=True, type=PathArg, help="The PEFT LoRA adapter directory to fuse in.")
@click.option("--out", required=True, type=PathArg, help="Directory to write (an optimum ORTModelForCausalLM).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory at --out.")
def merge(bundle, adapter, out, overwrite):
    """(device) Fuse --adapter into the bundle's base weights: a standalone ONNX model directory."""
    from edgeft.device.merge import MergeConfig
    from edgeft.device.merge import merge as run_merge

    click.echo(f"merged: {run_merge(MergeConfig(bundle, adapter, out, overwrite))}")


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=DIR", help="Serve an adapter as model NAME.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="EDGEFT_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGEFT_API_KEY).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=1), help="Busy (503) beyond this.")
@click.option("--provider", help="Execution provider, e.g. cpu or cuda (default: the best available).")
@click.option("--threads", type=int)
def serve(bundle, adapter_specs, host, port, api_key, max_queue, provider, threads):
    """(device) Serve the bundle and its adapters over an OpenAI-compatible HTTP API."""
    from edgeft.device.server import ServeConfig
    from edgeft.device.server import serve as run_server

    adapters = {}
    for spec in adapter_specs:
        name, _, path = spec.partition("=")
        if not name or not path or name in adapters:
            raise click.BadParameter(f"{spec!r}: expected NAME=DIR, each NAME once", param_hint="--adapter")
        adapters[name] = Path(path)
    run_server(ServeConfig(bundle, adapters, host, port, api_key, max_queue, provider, threads))


@main.group(invoke_without_command=True)
@click.pass_context
def devices(ctx):
    """Device profiles (devices/*.toml): list them, or check this machine against one."""
    if ctx.invoked_subcommand is None:
        from edgeft.profiles import list_profiles, profiles_table

        click.echo(profiles_table(list_profiles()))


@devices.command(name="check")
@click.option("--profile", help="A profile name (see `edgeft devices`) or the path of a profile file.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def devices_check(profile, as_json):
    """Report this machine (arch, memory, cores, onnxruntime build, providers) and what --profile gets here."""
    from edgeft.device.doctor import check, render
    from edgeft.profiles import load_profile

    report = check(load_profile(profile) if profile else None)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-seq-len", type=click.IntRange(min=2), help="Default: the bundle's.")
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"train_peak_mb": ..., "serve_peak_mb": ...} and the parts.'
)
def plan(bundle, batch_size, max_seq_len, as_json):
    """(device) Estimate peak memory of training and of serving BUNDLE on this machine."""
    from edgeft.bundle import Bundle
    from edgeft.device.planner import plan as make_plan

    result = make_plan(Bundle.open(bundle), batch_size, max_seq_len).as_dict()
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"training  (batch {result['batch_size']}, seq {result['max_seq_len']}): {result['train_peak_mb']:.0f} MB peak"
    )
    click.echo(f"serving   (one request of {result['max_seq_len']} tokens):  {result['serve_peak_mb']:.0f} MB peak")
    parts = ("runtime_mb", "weights_mb", "lora_state_mb", "train_activations_mb", "kv_cache_mb")
    click.echo("  " + ", ".join(f"{k.removesuffix('_mb')} {result[k]:.0f} MB" for k in parts))


if __name__ == "__main__":
    main()
