"""Decode speed against onnxruntime-genai and transformers (issue #14), on the benchmark's
Phi-3-shaped model (``benchmarks/common.py``), greedy, same prompt, 2 threads.

Rows, at contexts 128 and 2048 (prompt tokens; then ``new_tokens`` greedy tokens, eos ignored):

- ``edgeft``: ``edgeft generate``'s decoder (``decoder_lora.onnx``: GroupQueryAttention, the KV cache
  preallocated and bound as past and present), base model and adapter A.
- ``edgeft-concat``: the same on a bundle exported with the eager attention whose cache grows by
  Concat (``edgeft.host.decoder.GQA = False``): the before/after of the shared KV cache.
- ``genai-merged``: onnxruntime-genai on ``edgeft merge`` output with adapter A (the issue's "same
  merged model": ``decoder.onnx``, eager attention, ``past_present_share_buffer`` false).
- ``genai-adapters``: onnxruntime-genai on ``edgeft export-genai`` output (the GQA decoder edgeft
  runs), base model and adapter A through its ``Adapters`` API.
- ``transformers``: ``generate`` with the PEFT adapter (eager attention, as in bench.py).

Decode tokens/s = 1 / (the median time between two consecutive new tokens): the prefill is
excluded, as in bench.py's decode rows, and so is a single slow step. onnxruntime-genai needs onnxruntime >= 1.31, so the
edgeft and genai rows run in the device venv (``EDGEFT_DEVICE_VENV``, default ``.venv-device``),
transformers in this (host) venv; each in its own process.

    .venv/bin/python benchmarks/genai_decode.py [--quick]   # writes benchmarks/genai_decode.json

Hooking into bench.py (kept separate while bench.py is being reworked): call
``genai_decode.run(plan["genai_decode"])`` after ``bench_decode`` and store the result under
``results["genai_decode"]``; ``genai_decode.table(result)`` renders the RESULTS.md table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402

# 64 tokens x 5 repeats: a 3 x 32 run spread 25 % between repeats of one engine on this 2-core box.
FULL = {"contexts": [128, 2048], "new_tokens": 64, "repeats": 5}
QUICK = {"contexts": [128], "new_tokens": 16, "repeats": 1}
OUT = HERE / "genai_decode.json"


def prompt_ids(n: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(n).integers(3, 512, size=n).tolist()  # the tokenizer's 512 ids, no specials


def _decode_rate(stamps: list[float]) -> float:
    """1 / the median time between two new tokens: one slow step (the box's other work) moves it
    little, where (n - 1) / span took it whole."""
    return 1.0 / statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


# ---------------------------------------------------------------------------------------------
# Workers


def worker_device(args) -> dict:
    """edgeft and onnxruntime-genai, in the device venv, all loaded in one process and run in
    turn for every repeat, so a busy moment on the machine hits each of them alike."""
    import onnxruntime
    import onnxruntime_genai as og

    from edgeft.device.decoder import BASE, Sampling
    from edgeft.device.generate import TextGenerator

    def edgeft_run(gen: TextGenerator, adapter: str):
        def run(ids: list[int]) -> float:
            stamps = []
            sampling = Sampling(max_new_tokens=args.new_tokens)
            for _token in gen.decoder.generate_ids(ids, adapter, sampling, set()):
                stamps.append(time.perf_counter())
            return _decode_rate(stamps)

        return run

    def genai_run(model, adapters, adapter: str | None):
        def run(ids: list[int]) -> float:
            params = og.GeneratorParams(model)
            total = len(ids) + args.new_tokens
            params.set_search_options(max_length=total, min_length=total, do_sample=False)
            generator = og.Generator(model, params)
            if adapter:
                generator.set_active_adapter(adapters, adapter)
            generator.append_tokens(ids)
            stamps = []
            while not generator.is_done():
                generator.generate_next_token()
                stamps.append(time.perf_counter())
            return _decode_rate(stamps)

        return run

    runs = {}
    for label, bundle in (("edgeft", args.bundle), ("edgeft-concat", args.concat_bundle)):
        gen = TextGenerator(bundle, provider="cpu", threads=common.THREADS)
        gen.decoder.add_adapter("a", args.adapter)
        runs[f"{label}/base"] = edgeft_run(gen, BASE)
        runs[f"{label}/adapter"] = edgeft_run(gen, "a")
    merged = og.Model(args.merged)
    runs["genai-merged/adapter"] = genai_run(merged, None, None)
    exported = og.Model(args.genai)
    adapters = og.Adapters(exported)
    adapters.load(f"{args.genai}/a.onnx_adapter", "a")
    runs["genai-adapters/base"] = genai_run(exported, adapters, None)
    runs["genai-adapters/adapter"] = genai_run(exported, adapters, "a")

    out: dict = {"versions": {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": og.__version__}}
    for ctx in args.contexts:
        ids = prompt_ids(ctx)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):  # the order rotates: no engine always runs first or last
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                rates[name].append(runs[name](ids))
        for name, values in rates.items():
            out[f"{name}/{ctx}"] = statistics.median(values)
            out.setdefault("samples", {})[f"{name}/{ctx}"] = values
            print(f"{name} ctx {ctx}: {out[f'{name}/{ctx}']:.2f} tok/s {values}", file=sys.stderr, flush=True)
    return out


def worker_torch(args) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(common.THREADS)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    import transformers

    out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    for kind, ctx in [(k, c) for k in ("base", "adapter") for c in args.contexts]:
        rates = []
        for _ in range(args.repeats):
            clock = _Clock()
            ids = torch.tensor([prompt_ids(ctx)])
            adapters = model.disable_adapter() if kind == "base" else contextlib.nullcontext()
            with torch.no_grad(), adapters:
                model.generate(
                    input_ids=ids,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    streamer=clock,
                )
            rates.append(_decode_rate(clock.stamps[1:]))
        out[f"transformers/{kind}/{ctx}"] = statistics.median(rates)
        out.setdefault("samples", {})[f"transformers/{kind}/{ctx}"] = rates
        print(
            f"transformers {kind} ctx {ctx}: {out[f'transformers/{kind}/{ctx}']:.2f} tok/s", file=sys.stderr, flush=True
        )
    return out


class _Clock:
    """A transformers streamer that only notes the time: called with the prompt, then once per new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, _value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Orchestration (host venv)


# The grid's phi3 model with 4x MLP and 12 layers (162M), its context raised to 4096 so that a
# 2048-token prompt plus the new tokens fit.
SPEC_ARGS = ("phi3", 4, 12)
CONTEXT = 4096


def _spec() -> dict:
    spec = common.model_spec(*SPEC_ARGS)
    spec["config"]["max_position_embeddings"] = CONTEXT
    spec["name"] += f"-ctx{CONTEXT}"
    return spec


def _bundles(spec: dict, p: dict) -> tuple[Path, Path, float]:
    """The model, adapter A and two bundles of it (once, in the cache): GroupQueryAttention and the
    Concat-growing eager decoder (``edgeft.host.decoder.GQA = False``)."""
    job = {"spec": spec, "adapters": ["attn"]}
    subprocess.run(
        [sys.executable, str(HERE / "build.py"), json.dumps(job)], check=True, env=_env(), stdout=subprocess.DEVNULL
    )
    gqa, concat = p["root"] / f"bundle-gqa-{CONTEXT}", p["root"] / f"bundle-concat-{CONTEXT}"
    seconds = 0.0
    for out, flag in ((gqa, True), (concat, False)):
        if (out / "manifest.json").is_file():
            continue
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import common\n"
            f"import edgeft.host.decoder as d; d.GQA = {flag}\n"
            "from edgeft.host.export import ExportConfig, export_bundle\n"
            "export_bundle(ExportConfig(sys.argv[2], sys.argv[3], lora_r=common.LORA_R, lora_alpha=common.LORA_ALPHA,"
            f" init_adapter=sys.argv[4], max_seq_len={CONTEXT}, overwrite=True))\n"
        )
        t0 = time.perf_counter()
        args = [str(HERE), str(p["model"]), str(out), str(p["adapter_a"])]
        subprocess.run([sys.executable, "-c", code, *args], check=True, env=_env())
        seconds += time.perf_counter() - t0
    return gqa, concat, seconds


def _env() -> dict:
    common.set_threads()
    return {**os.environ, "PYTHONPATH": str(common.ROOT)}


def _genai_dirs(p: dict, bundle: Path, device_python: str) -> tuple[Path, Path]:
    """edgeft merge (adapter A) and edgeft export-genai (adapter A) of the bundle, in the device venv;
    their genai_config.json asks for the benchmark's thread count."""
    merged, exported = p["root"] / "genai-merged", p["root"] / "genai-adapters"
    edgeft = [device_python, "-m", "edgeft.cli"]
    if not (merged / "model_genai.onnx").is_file():  # (merge output before it had its GQA model: redone)
        subprocess.run([*edgeft, "merge", str(bundle), "--adapter", str(p["adapter_a"]), "--out", str(merged),
                        "--overwrite"], check=True, env=_env())  # fmt: skip
    if not (exported / "genai_config.json").is_file():
        subprocess.run([*edgeft, "export-genai", str(bundle), "--adapter", f"a={p['adapter_a']}", "--out",
                        str(exported), "--overwrite"], check=True, env=_env())  # fmt: skip
    for directory in (merged, exported):
        config = json.loads((directory / "genai_config.json").read_text())
        config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = common.THREADS
        config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
        (directory / "genai_config.json").write_text(json.dumps(config, indent=2))
    return merged, exported


def run(plan: dict, log=print) -> dict:
    spec = _spec()
    p = common.paths(spec, "attn")
    device_python = str(Path(os.environ.get("EDGEFT_DEVICE_VENV", common.ROOT / ".venv-device")) / "bin" / "python")
    log("genai decode: the model, its two bundles and the onnxruntime-genai directories (first run only)")
    bundle, concat, export_seconds = _bundles(spec, p)
    merged, exported = _genai_dirs(p, bundle, device_python)
    facts = common.model_facts(spec, "attn")
    meta = {"model": spec["name"], "n_params": facts["params_total"], "config": spec["config"]}
    meta["max_seq_len"], meta["export_seconds_this_run"] = CONTEXT, export_seconds
    shared = ["--contexts", *map(str, plan["contexts"]), "--new-tokens", str(plan["new_tokens"])]
    shared += ["--repeats", str(plan["repeats"]), "--adapter", str(p["adapter_a"])]
    results: dict = {}
    device = [device_python, str(Path(__file__)), "--worker", "device", *shared, "--bundle", str(bundle)]
    device += ["--concat-bundle", str(concat), "--merged", str(merged), "--genai", str(exported)]
    torch = [sys.executable, str(Path(__file__)), "--worker", "torch", *shared, "--model", str(p["model"])]
    versions: dict = {}
    samples: dict = {}
    load = {"before": os.getloadavg()[0]}  # 1-minute load average: other processes on the machine
    for cmd in (device, torch):
        done = subprocess.run(cmd, check=True, env=_env(), stdout=subprocess.PIPE, text=True)
        part = json.loads(done.stdout.strip().splitlines()[-1])
        versions.update(part.pop("versions"))
        samples.update(part.pop("samples"))
        results.update(part)
    load["after"] = os.getloadavg()[0]
    return {"plan": plan, "meta": meta, "machine": common.machine_info(), "versions": versions,
            "load_average": load, "tokens_per_second": results, "samples": samples}  # fmt: skip


def table(result: dict) -> str:
    r = result["tokens_per_second"]
    lines = [
        "| context | adapter | edgeft | edgeft (Concat cache) | genai, merged | genai, export-genai | transformers | edgeft / genai | edgeft / transformers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ctx in result["plan"]["contexts"]:
        for kind in ("base", "adapter"):
            e = r[f"edgeft/{kind}/{ctx}"]
            genai_best = max(r.get(f"genai-merged/{kind}/{ctx}", 0), r[f"genai-adapters/{kind}/{ctx}"])
            t = r.get(f"transformers/{kind}/{ctx}")
            cells = [
                str(ctx),
                kind,
                f"{e:.1f}",
                f"{r[f'edgeft-concat/{kind}/{ctx}']:.1f}",
                f"{r[f'genai-merged/{kind}/{ctx}']:.1f}" if f"genai-merged/{kind}/{ctx}" in r else "–",
                f"{r[f'genai-adapters/{kind}/{ctx}']:.1f}",
                f"{t:.1f}" if t else "–",
                f"{e / genai_best:.2f}x",
                f"{e / t:.2f}x" if t else "–",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def samples_table(result: dict) -> str:
    """Every repeat's tokens/s, in the order they ran (engines interleaved within a repeat)."""
    lines = ["| run | tokens/s per repeat |", "|---|---|"]
    for key, values in result["samples"].items():
        lines.append(f"| {key} | {', '.join(f'{v:.1f}' for v in values)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["device", "torch"])
    ap.add_argument("--contexts", type=int, nargs="+")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--repeats", type=int)
    for name in ("--adapter", "--bundle", "--concat-bundle", "--merged", "--genai", "--model"):
        ap.add_argument(name)
    args = ap.parse_args()
    if args.worker:
        result = worker_device(args) if args.worker == "device" else worker_torch(args)
        print(json.dumps(result))
        return
    result = run(QUICK if args.quick else FULL)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print()
    print(samples_table(result))
    import report  # benchmarks/report.py: RESULTS.md with this section

    report.rewrite()


if __name__ == "__main__":
    main()
