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


def _json_object(_ctx, param, value):
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise EdgeftError(f"{param.opts[0]}: invalid JSON ({e}); expected e.g. '{{\"q_proj\": 16}}'") from None
    if not isinstance(parsed, dict):
        raise EdgeftError(f"{param.opts[0]}: expected a JSON object such as '{{\"q_proj\": 16}}', got {value}")
    return parsed


PROFILE = click.option("--profile", help="Device profile (see `edgeft devices`): threads, providers, memory budget.")
TRUSTED_KEY = click.option(
    "--trusted-key",
    type=PathArg,
    help="Public key (edgeft keygen's KEYFILE.pub): refuse bundles not signed by it, or with any file "
    "changed [default: env EDGEFT_TRUSTED_KEY].",
)


@main.command()
@click.argument("model_dir", type=PathArg)
@click.option("--out", required=True, type=PathArg, help="Bundle directory to write.")
@click.option("--lora-r", default=8, show_default=True, type=int)
@click.option("--lora-alpha", default=16.0, show_default=True, type=float)
@click.option("--lora-dropout", default=0.0, show_default=True, type=float)
@click.option("--target-modules", callback=_csv, help="Comma-separated LoRA targets (default: per model type).")
@click.option("--rslora", "use_rslora", is_flag=True, help="Rank-stabilized LoRA (PEFT use_rslora): alpha / sqrt(r).")
@click.option("--dora", "use_dora", is_flag=True, help="DoRA (PEFT use_dora): also train a magnitude per output row.")
@click.option(
    "--rank-pattern",
    callback=_json_object,
    help="Per-module r as JSON, PEFT's rank_pattern (keys match module name ends), e.g. '{\"q_proj\": 16}'.",
)
@click.option(
    "--alpha-pattern",
    callback=_json_object,
    help="Per-module alpha as JSON, PEFT's alpha_pattern, e.g. '{\"v_proj\": 32}'.",
)
@click.option("--max-seq-len", type=int, help="Longest sample/context [default: the profile's, else 512].")
@click.option(
    "--init-adapter",
    type=PathArg,
    help="Start from this PEFT LoRA adapter (its r/alpha/targets, DoRA/rsLoRA and patterns win).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
@click.option("--sign-key", type=PathArg, help="Sign the bundle with this private key (from `edgeft keygen`).")
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8", "int4"]),
    help="Store the frozen base weights quantized (int8 per output row; int4 block-wise). LoRA stays fp32. "
    "[default: the profile's defaults.quantization, else none]",
)
@click.option(
    "--quant-block-size",
    default=32,
    show_default=True,
    type=click.Choice(["16", "32", "64", "128", "256"]),
    callback=lambda ctx, param, value: int(value),
    help="Block size along the input dimension for --quantize int4.",
)
@click.option(
    "--quant-compute",
    default="fp32",
    show_default=True,
    type=click.Choice(["fp32", "int8", "dequant"]),
    help="With --quantize int4, how training multiplies by the frozen weights: MatMulNBits with fp32 or "
    "int8 accuracy_level (the backward reads a second int4 layout of W^T), or dequant (float32 weights one "
    "layer at a time, no W^T layout: the least memory).",
)
@click.option(
    "--recompute",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "none", "layers"]),
    help="Layer recomputation in the backward (less memory, more compute). auto: write both training "
    "graphs and let `edgeft train` pick the one that fits the device's memory.",
)
@click.option(
    "--loss-chunk-rows",
    type=click.IntRange(min=0),
    help="Causal LM: run the loss head over this many labelled rows at a time (0: all at once). Fewer rows "
    "hold less memory and take a little longer. [default: 128 MB of float32 logits, at least 128 rows]",
)
@click.option(
    "--task",
    type=click.Choice(["causal-lm", "seq-cls", "token-cls"]),
    default="causal-lm",
    show_default=True,
    help="What the model learns: next tokens, one label per text (seq-cls) or one label per word (token-cls).",
)
@click.option(
    "--labels",
    callback=_csv,
    help="Comma-separated class names for seq-cls / token-cls, in class-id order (token-cls: e.g. O,B-PART,I-PART).",
)
@PROFILE
def export(profile, max_seq_len, quantize, **options):
    """(host) Export MODEL_DIR (a Hugging Face causal LM, or a classifier with --task) to a training bundle."""
    from edgeft.host.export import ExportConfig, export_bundle
    from edgeft.profiles import load_profile

    defaults = load_profile(profile).defaults if profile else None
    if max_seq_len is None:
        max_seq_len = defaults.max_seq_len if defaults else 512
    quantize = quantize or (defaults.quantization if defaults else "none")
    cfg = ExportConfig(max_seq_len=max_seq_len, quantize=None if quantize == "none" else quantize, **options)
    click.echo(f"bundle: {export_bundle(cfg)}")


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
@click.option("--save-every", default=0, show_default=True, type=int, help="Checkpoint every N steps (0: off).")
@click.option(
    "--save-minutes",
    default=5.0,
    show_default=True,
    type=float,
    help="Also checkpoint whenever this many minutes passed since the last checkpoint (0: off).",
)
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in --out.")
@click.option("--truncate", is_flag=True, help="Cut over-long samples instead of refusing them.")
@click.option("--threads", type=int, help="Intra-op threads (default: all cores).")
@click.option("--provider", help="cpu or cuda (default: the profile's, else cpu).")
@click.option(
    "--memory-budget",
    "memory_budget_mb",
    type=click.FloatRange(min=1),
    help="MB; refuse runs estimated above it [default: the profile's, else available memory].",
)
@click.option(
    "--recompute",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "none", "layers"]),
    help="Layer recomputation (less memory, ~30 % more compute). auto: only when the run would not fit "
    "the memory budget otherwise (needs a bundle exported with --recompute auto).",
)
@click.option(
    "--prepack",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "on", "off"]),
    help="int4 bundles: pre-pack the weights for MatMulNBits (faster steps; the file pages they are packed "
    "from are dropped, so no more memory with fp32 compute). auto: whenever that needs no more memory, else "
    "when it fits the memory budget.",
)
@click.option("--no-progress", is_flag=True)
@PROFILE
@TRUSTED_KEY
def train(no_progress, **options):
    """(device) Fine-tune the bundle's LoRA adapter on local data."""
    from edgeft.device.train import TrainConfig
    from edgeft.device.train import train as run_training

    summary = run_training(TrainConfig(progress=not no_progress, **options))
    keys = ("steps", "eval_loss_before", "eval_loss", "tokens_per_second", "peak_rss_mb", "seconds")
    shown = {k: summary[k] for k in keys}
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
@PROFILE
@TRUSTED_KEY
def eval_(**options):
    """(device) Print {"loss", "perplexity"} of the bundle on DATA (classifiers: accuracy and macro-F1,
    or entity-level precision/recall/F1)."""
    from edgeft.device.evaluate import EvalConfig, evaluate

    click.echo(json.dumps(evaluate(EvalConfig(**options))))


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--text", multiple=True, help="A text to classify (repeatable).")
@click.option("--data", type=PathArg, help='JSON Lines: {"text": ...} (token-cls also {"tokens": [...]}).')
@click.option("--adapter", type=PathArg, help="A PEFT LoRA adapter directory (default: the bundle's initial one).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--max-seq-len", type=int)
@click.option("--truncate", is_flag=True, help="Cut over-long texts instead of refusing them.")
@click.option("--threads", type=int)
@PROFILE
@TRUSTED_KEY
def predict(text, **options):
    """(device) Print one JSON line per input: label and probabilities (seq-cls), or entities with spans (token-cls)."""
    from edgeft.device.classify import PredictConfig
    from edgeft.device.classify import predict as run_predict

    run_predict(PredictConfig(text=list(text), **options))


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
@click.option(
    "--provider", help="Execution provider, e.g. cpu or cuda (default: the profile's, else the best available)."
)
@click.option("--threads", type=int)
@PROFILE
@TRUSTED_KEY
def generate(stop, **options):
    """(device) Stream a completion of --prompt to stdout."""
    from edgeft.device.generate import GenerateConfig
    from edgeft.device.generate import generate as run_generate

    run_generate(GenerateConfig(stop=list(stop), **options))


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--adapter", required=True, type=PathArg, help="The PEFT LoRA adapter directory to fuse in.")
@click.option("--out", required=True, type=PathArg, help="Directory to write (an optimum ORTModelForCausalLM).")
@click.option("--overwrite", is_flag=True, help="Replace an existing directory at --out.")
@TRUSTED_KEY
def merge(bundle, adapter, out, overwrite, trusted_key):
    """(device) Fuse --adapter into the bundle's base weights: a standalone ONNX model directory."""
    from edgeft.device.merge import MergeConfig
    from edgeft.device.merge import merge as run_merge

    click.echo(f"merged: {run_merge(MergeConfig(bundle, adapter, out, overwrite, trusted_key=trusted_key))}")


@main.command()
@click.argument("bundle", type=PathArg)
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=DIR", help="Serve an adapter as model NAME.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="EDGEFT_API_KEY", help="Require 'Authorization: Bearer KEY' (env EDGEFT_API_KEY).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(min=1), help="Busy (503) beyond this.")
@click.option("--provider", help="Execution provider, e.g. cpu or cuda (default: the best available).")
@click.option("--threads", type=int)
@click.option("--insecure", is_flag=True, help="Allow a non-loopback --host without --api-key.")
@click.option(
    "--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1), help="Larger bodies get 413."
)
@click.option(
    "--max-prompt-chars", default=64 << 10, show_default=True, type=click.IntRange(min=1), help="Longer prompts: 400."
)
@click.option(
    "--request-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds; a request still generating then is stopped (504).",
)
@TRUSTED_KEY
@PROFILE
def serve(adapter_specs, **options):
    """(device) Serve the bundle and its adapters over an OpenAI-compatible HTTP API (classifiers: POST /v1/classify)."""
    from edgeft.device.server import ServeConfig
    from edgeft.device.server import serve as run_server

    run_server(ServeConfig(adapters=_named_adapters(adapter_specs), **options))


def _named_adapters(specs) -> dict[str, Path]:
    adapters = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path or name in adapters:
            raise click.BadParameter(f"{spec!r}: expected NAME=DIR, each NAME once", param_hint="--adapter")
        adapters[name] = Path(path)
    return adapters


@main.command(name="export-genai")
@click.argument("bundle", type=PathArg)
@click.option("--out", required=True, type=PathArg, help="Directory to write (an onnxruntime-genai model).")
@click.option(
    "--adapter", "adapter_specs", multiple=True, metavar="NAME=DIR", help="Write a PEFT adapter as NAME.onnx_adapter."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing directory at --out.")
@TRUSTED_KEY
def export_genai(bundle, out, adapter_specs, overwrite, trusted_key):
    """(device) The bundle as an onnxruntime-genai model whose adapters switch with its Adapters API."""
    from edgeft.device.genai import GenaiConfig
    from edgeft.device.genai import export_genai as run_export

    cfg = GenaiConfig(bundle, out, _named_adapters(adapter_specs), overwrite, trusted_key)
    click.echo(f"onnxruntime-genai model: {run_export(cfg)}")


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
@click.argument("path", metavar="BUNDLE|MODEL_DIR", type=PathArg)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-seq-len", type=click.IntRange(min=2), help="Default: the bundle's; for a model, the profile's, else 512."
)
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"train_peak_mb": ..., "serve_peak_mb": ...} and the parts.'
)
@PROFILE
@click.option(
    "--memory-budget",
    "memory_budget_mb",
    type=click.FloatRange(min=1),
    help="MB to plan against [default: the profile's ram_budget_mb, else this machine's available memory].",
)
@click.option("--lora-r", default=8, show_default=True, type=click.IntRange(min=1), help="MODEL_DIR: LoRA rank.")
@click.option("--quant-block-size", default=32, show_default=True, type=int, help="MODEL_DIR: int4 block size.")
@TRUSTED_KEY
def plan(path, batch_size, max_seq_len, as_json, profile, memory_budget_mb, lora_r, quant_block_size, trusted_key):
    """(device) Estimate peak memory of training and serving: a BUNDLE on this machine, or a
    Hugging Face MODEL_DIR before export, for each precision and recompute setting against a budget."""
    from edgeft.bundle import MANIFEST

    if not (path / MANIFEST).is_file() and (path / "config.json").is_file():
        from edgeft.device.planner import plan_model_dir

        click.echo(
            plan_model_dir(path, batch_size, max_seq_len, profile, memory_budget_mb, lora_r, quant_block_size, as_json)
        )
        return
    from edgeft.bundle import Bundle
    from edgeft.device.planner import plan as make_plan

    result = make_plan(Bundle.open(path, trusted_key=trusted_key), batch_size, max_seq_len).as_dict()
    budget = _plan_budget(profile, memory_budget_mb)
    if budget is not None:
        result["budget_mb"] = budget
        train = result["train_peak_mb"] + min(0.0, result["train_prepack_mb"])  # --prepack auto's choice
        result["fits"] = max(train, result["serve_peak_mb"]) <= budget
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"training  (batch {result['batch_size']}, seq {result['max_seq_len']}): {result['train_peak_mb']:.0f} MB peak, "
        f"{result['train_recompute_peak_mb']:.0f} MB with layer recomputation"
    )
    if result["train_prepack_mb"]:  # int4 MatMulNBits bundles: edgeft train --prepack
        packed = [result[k] + result["train_prepack_mb"] for k in ("train_peak_mb", "train_recompute_peak_mb")]
        click.echo(f"  int4 weights pre-packed (--prepack on, or auto): {packed[0]:.0f} MB, {packed[1]:.0f} MB")
    click.echo(f"serving   (one request of {result['max_seq_len']} tokens):  {result['serve_peak_mb']:.0f} MB peak")
    parts = ("runtime_mb", "weights_mb", "lora_state_mb", "train_activations_mb", "kv_cache_mb")
    click.echo("  " + ", ".join(f"{k.removesuffix('_mb')} {result[k]:.0f} MB" for k in parts))
    if budget is not None:
        click.echo(f"budget    {budget:.0f} MB: {'fits' if result['fits'] else 'does not fit'}")


def _plan_budget(profile: str | None, memory_budget_mb: float | None) -> float | None:
    if memory_budget_mb is not None or profile is None:
        return memory_budget_mb
    from edgeft.profiles import load_profile

    return float(load_profile(profile).ram_budget_mb)


@main.group()
def fleet():
    """Federated fine-tuning over Flower: devices train locally, a server merges their adapters."""


@fleet.command(name="server")
@click.argument("bundle", type=PathArg)
@click.option("--rounds", required=True, type=click.IntRange(min=1), help="Federated rounds.")
@click.option("--min-clients", required=True, type=click.IntRange(min=1), help="Devices a round waits for.")
@click.option("--out", required=True, type=PathArg, help="Directory: round-NNN/adapter, history.json, logs.")
@click.option(
    "--aggregation",
    type=click.Choice(["svd", "stack", "fedavg"]),
    default="svd",
    show_default=True,
    help="svd: mean update truncated to rank r; stack: exact (rank grows; PEFT only), then svd to go on; "
    "fedavg: A and B averaged apart (baseline).",
)
@click.option(
    "--address", default="127.0.0.1:9092", show_default=True, help="HOST:PORT to listen on (loopback without TLS)."
)
@click.option("--eval-data", type=PathArg, help="Held-out JSON Lines: eval loss of each round's adapter.")
@click.option("--sign-key", type=PathArg, help="Sign every global adapter with this private key (edgeft keygen).")
@click.option(
    "--round-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a round waits for updates.",
)
@click.option(
    "--join-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a round waits for --min-clients devices.",
)
@click.option(
    "--max-update-norm",
    type=click.FloatRange(min=0, min_open=True),
    help="Reject updates that move the adapter farther (Frobenius, weight space).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--ssl-certfile", type=PathArg, help="TLS: the server's certificate.")
@click.option("--ssl-keyfile", type=PathArg, help="TLS: its private key.")
@click.option(
    "--ssl-ca-certfile", type=PathArg, help="TLS: the CA that signed it (devices get it as --root-certificates)."
)
@click.option(
    "--supernode-auth", is_flag=True, help="Flower node authentication: only registered device keys join (needs TLS)."
)
@click.option("--no-progress", is_flag=True, help="Write Flower's run log to OUT/flwr-run.log instead of stdout.")
def fleet_server(no_progress, **options):
    """(server) Run N federated rounds of BUNDLE's adapter with the devices that join."""
    from edgeft.fleet.server import ServerConfig, round_table, serve

    history = serve(ServerConfig(progress=not no_progress, **options))
    click.echo(round_table(history))


@fleet.command(name="client")
@click.argument("bundle", type=PathArg)
@click.option("--data", required=True, type=PathArg, help="This device's training data, JSON Lines (never leaves it).")
@click.option("--server", required=True, help="The fleet server, HOST:PORT.")
@click.option(
    "--state-dir",
    default="edgeft-fleet-client",
    show_default=True,
    type=PathArg,
    help="Checkpoints and logs of this device.",
)
@click.option("--name", help="How the server's log names this device [default: the host name].")
@click.option("--steps-per-round", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-4, show_default=True, type=float)
@click.option("--warmup-steps", default=0, show_default=True, type=int)
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--grad-accum", default=1, show_default=True, type=int)
@click.option("--max-seq-len", type=int, help="Default: the bundle's.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--save-every",
    default=5,
    show_default=True,
    type=click.IntRange(min=0),
    help="Checkpoint every N steps of a round (0: never).",
)
@click.option("--truncate", is_flag=True, help="Cut over-long samples instead of refusing them.")
@click.option("--threads", type=int, help="Intra-op threads (default: all cores).")
@click.option("--trusted-key", type=PathArg, help="Refuse global adapters not signed by this public key.")
@click.option("--root-certificates", type=PathArg, help="TLS: the CA certificate of the server.")
@click.option("--auth-key", type=PathArg, help="Flower node authentication: this device's private key (needs TLS).")
@click.option(
    "--idle-timeout", type=click.FloatRange(min=0, min_open=True), help="Stop after this many seconds without a round."
)
@click.option("--no-progress", is_flag=True)
def fleet_client(no_progress, **options):
    """(device) Join a fleet server: train each round's global adapter on --data, send back the update."""
    from edgeft.fleet.client import ClientConfig, join

    result = join(ClientConfig(progress=not no_progress, **options))
    click.echo(json.dumps({"rounds": len([r for r in result["rounds"] if "refused" not in r])}))


@main.command()
@click.option("--out", required=True, type=PathArg, help="Private key file to write; the public key goes to OUT.pub.")
def keygen(out):
    """(host) Make an ed25519 signing key pair for `edgeft export --sign-key`."""
    from edgeft.signing import keygen as make_keys

    private, public = make_keys(out)
    click.echo(f"private key: {private} (keep it secret)\npublic key: {public} (give to devices: --trusted-key)")


@main.command()
@click.argument("bundle", type=PathArg)
@TRUSTED_KEY
def verify(bundle, trusted_key):
    """Check every file of BUNDLE against its manifest's sha256 and, with a trusted key, its signature."""
    from edgeft.signing import verify_bundle

    click.echo(verify_bundle(bundle, trusted_key))


if __name__ == "__main__":
    main()
