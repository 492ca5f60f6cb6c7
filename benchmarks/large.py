"""`make bench-large`: the models people put on devices, at their real sizes (issue: real models).

    python benchmarks/large.py [--only phi3-mini|llama-3.2-1b] [--precision int4-dequant] [--steps 3] [--reuse | --replan]

For each shape (random weights from the published config, saved as a bf16 sharded checkpoint the
way the Hub ships them): `edgeft export` (fp32 and/or int4), its wall time per stage and its host
peak RSS; then in the torch-free device venv `edgeft train` (batch 1, seq 256, a few steps,
`--recompute auto`) and `edgeft generate` (128-token prompt + 32 new tokens), each its peak RSS and
speed, beside `edgeft plan`'s prediction. Every command runs in its own process; peak RSS is that
process's (ru_maxrss of a one-child wrapper). Results: benchmarks/large_results.json and the
"Real model sizes" section of RESULTS.md. Needs ~20 GB of free RAM and ~40 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("EDGEFT_BENCH_CACHE", ROOT / "benchmarks" / ".cache")) / "large"
HOST = ROOT / ".venv" / "bin" / "python"
DEVICE = ROOT / ".venv-device" / "bin"
RESULTS = ROOT / "benchmarks" / "large_results.json"

# The published configs in examples/shapes (Phi-3-mini-4k-instruct, Llama-3.2-1B: tied embeddings,
# llama3 rope scaling) and the precisions each is exported in. int4-dequant: int4 weights that the
# training graph dequantizes per layer (--quant-compute dequant), with no second Wᵀ layout to store.
# int4-b128: int4 in blocks of 128 (one float32 scale per 128 weights instead of 32: the W and Wᵀ
# layouts 15 % smaller; 128 is the group size GPTQ/AWQ checkpoints and ORT's own quantizer default to).
SHAPES = {
    "phi3-mini": ("phi-3-mini-4k", ("int4", "int4-dequant", "int4-b128")),
    "llama-3.2-1b": ("llama-3.2-1b", ("fp32", "int4")),
}
EXPORT_FLAGS = {
    "fp32": [],
    "int4": ["--quantize", "int4"],
    "int4-dequant": ["--quantize", "int4", "--quant-compute", "dequant"],
    "int4-b128": ["--quantize", "int4", "--quant-block-size", "128"],
}
TARGETS = {"phi3-mini": {"export_peak_mb": 20 * 1024, "export_minutes": 30, "train_mb": 5 * 1024, "serve_mb": 3 * 1024}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd`` in its own process; (result, wall seconds, its peak RSS in MB)."""
    wrapper = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr); "
        "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)"
    )
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - t0
    peak = re.search(r"PEAK_KB (\d+)", result.stderr)
    return result, seconds, int(peak.group(1)) / 1024 if peak else float("nan")


def build_checkpoint(name: str) -> Path:
    """The shape's config with random weights, saved bf16 in 2 GB shards, plus a tokenizer."""
    model = CACHE / name / "model"
    if (model / "config.json").is_file():
        return model
    log(f"{name}: building a random bf16 checkpoint (first run only)")
    config = json.loads((ROOT / "examples" / "shapes" / SHAPES[name][0] / "config.json").read_text())
    dropped = ("architectures", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id")
    shape = {k: v for k, v in config.items() if k not in dropped}
    code = f"""
import json, sys, torch
from pathlib import Path
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM
sys.path.insert(0, {str(ROOT)!r})
from edgeft.host.tiny import train_tokenizer
out = Path({str(model)!r})
train_tokenizer(out, vocab_size=512, model_max_length=4096)
tok = Tokenizer.from_file(str(out / "tokenizer.json"))
ids = {{n: tok.token_to_id(n) for n in ("<s>", "</s>", "<pad>")}}
shape = json.loads({json.dumps(json.dumps(shape))})
config = AutoConfig.for_model(shape.pop("model_type"), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                              pad_token_id=ids["<pad>"], torch_dtype="bfloat16", **shape)
torch.manual_seed(0)
with torch.device("meta"):
    m = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
m = m.to_empty(device="cpu")
with torch.no_grad():
    for p in m.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
m.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
print(sum(p.numel() for p in m.parameters()))
"""
    result = subprocess.run([str(HOST), "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return model


def export(name: str, model: Path, precision: str) -> dict:
    bundle = CACHE / name / f"bundle-{precision}"
    args = ["export", str(model), "--out", str(bundle), "--overwrite", "--max-seq-len", "512", *EXPORT_FLAGS[precision]]
    log(f"{name}: edgeft export {' '.join(args[4:])}")
    code = "import logging, sys; logging.basicConfig(level=logging.INFO); from edgeft.cli import main; main()"
    result, seconds, peak = measured([str(HOST), "-c", code, *args])
    if result.returncode != 0:
        return {"error": result.stderr[-2000:], "seconds": seconds, "peak_rss_mb": peak}
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"export stage: (.+?): ([\d.]+) s", result.stderr)}
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    log(f"{name}: export {precision}: {seconds / 60:.1f} min, peak {peak / 1024:.1f} GB, bundle {size / 2**30:.2f} GB")
    return {
        "seconds": seconds,
        "peak_rss_mb": peak,
        "stages_s": stages,
        "bundle_bytes": size,
        "bundle": str(bundle),
        "source": source(),
    }


def source() -> dict:
    """Which edgeft measured a row: the commit, whether the tree had uncommitted changes, when."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return {"commit": commit or "unknown", "clean": not dirty.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M")}


def device_runs(name: str, bundle: Path, steps: int) -> dict:
    data = CACHE / "long.jsonl"
    if not data.is_file():
        words = (ROOT / "examples" / "data" / "corpus.txt").read_text().split()
        import random

        rng = random.Random(0)
        lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(600))}) for _ in range(8)]
        data.write_text("\n".join(lines) + "\n")
    out = {"plan": plan(bundle), "source": source()}
    # auto: the planner's choice for the memory this machine has free; layers: what a 5 GB device runs
    for recompute in ("auto", "layers"):
        out["train" if recompute == "auto" else "train_recompute"] = _train(name, bundle, data, steps, recompute)
    prompt = " ".join((ROOT / "examples" / "data" / "corpus.txt").read_text().split()[:110])
    log(f"{name}: edgeft generate {bundle.name}")
    # Decode speed through the CLI: the same command with 1 and 33 new tokens, the difference / 32.
    walls = {}
    for new in (1, 33):
        gen = ["generate", str(bundle), "--prompt", prompt, "--max-new-tokens", str(new)]
        result, walls[new], peak = measured([str(DEVICE / "edgeft"), *gen])
        if result.returncode != 0:
            break
    out["generate"] = {"peak_rss_mb": peak, "wall_seconds": walls[new], "ok": result.returncode == 0}
    if result.returncode != 0:
        out["generate"]["error"] = result.stderr[-2000:]
    elif walls[33] > walls[1]:  # else the box's noise outweighed 32 tokens: no figure
        out["generate"]["decode_tokens_per_second"] = 32 / (walls[33] - walls[1])
    train_peaks = ", ".join(f"{out[k].get('peak_rss_mb', 0):.0f}" for k in ("train", "train_recompute"))
    log(f"{name}: {bundle.name}: train peak {train_peaks} MB (auto, layers), generate peak {peak:.0f} MB")
    return out


def plan(bundle: Path) -> dict:
    """`edgeft plan BUNDLE --json` at the runs' batch and sequence."""
    args = [str(DEVICE / "edgeft"), "plan", str(bundle), "--batch-size", "1", "--max-seq-len", "256", "--json"]
    return json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)


def _train(name: str, bundle: Path, data: Path, steps: int, recompute: str) -> dict:
    run = CACHE / name / f"run-{bundle.name}-{recompute}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    args = ["train", str(bundle), "--data", str(data), "--out", str(run), "--max-steps", str(steps)]
    args += ["--batch-size", "1", "--max-seq-len", "256", "--truncate", "--no-progress", "--save-minutes", "0"]
    args += ["--recompute", recompute]  # --prepack auto, the default: int4 pre-packed when it needs no more memory
    log(f"{name}: edgeft train {bundle.name} --recompute {recompute}")
    result, seconds, peak = measured([str(DEVICE / "edgeft"), *args])
    if result.returncode != 0:
        return {"error": result.stderr[-2000:], "peak_rss_mb": peak}
    summary = json.loads((run / "summary.json").read_text())
    return {
        "peak_rss_mb": peak,
        "wall_seconds": seconds,
        "step_seconds": summary["seconds"] / summary["steps"],
        "tokens_per_second": summary["tokens_per_second"],
        "recompute": summary["recompute"],
        "prepack": summary.get("prepack", False),
        "losses": summary["losses"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=sorted(SHAPES))
    parser.add_argument("--precision", action="append", help="only these precisions (repeatable)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="keep bundles already exported (device runs only)")
    parser.add_argument("--replan", action="store_true", help="only redo the planner's rows (after a planner change)")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.replan:
        return replan(results)
    for name in [args.only] if args.only else list(SHAPES):
        model = build_checkpoint(name)
        entry = results.setdefault(name, {})
        entry["checkpoint_bytes"] = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for precision in [p for p in SHAPES[name][1] if not args.precision or p in args.precision]:
            bundle = CACHE / name / f"bundle-{precision}"
            if args.reuse and (bundle / "manifest.json").is_file() and f"export_{precision}" in entry:
                exported = entry[f"export_{precision}"]
            else:
                exported = export(name, model, precision)
            entry[f"export_{precision}"] = exported
            if "error" not in exported:
                entry[f"device_{precision}"] = device_runs(name, Path(exported["bundle"]), args.steps)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {RESULTS}")
    import report  # benchmarks/report.py: RESULTS.md with this section

    report.rewrite()


def replan(results: dict) -> None:
    """The planner's estimate for every bundle measured before, from the bundle as it was measured."""
    for name, entry in results.items():
        for key, device in entry.items():
            bundle = Path(entry.get(f"export_{key.removeprefix('device_')}", {}).get("bundle", ""))
            if key.startswith("device_") and (bundle / "manifest.json").is_file():
                device["plan"] = plan(bundle)
                log(f"{name}: {bundle.name}: replanned")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    import report  # benchmarks/report.py: RESULTS.md with this section

    report.rewrite()


if __name__ == "__main__":
    main()
