"""A/B measurements of each optimisation against the code or setting it replaced, interleaved
step by step in one process so both sides see the same machine load.

    python benchmarks/ab.py [--steps N]

Writes benchmarks/ab_results.json, which RESULTS.md's optimisation table reads (``make bench``
runs this after bench.py; ``make bench-quick`` reuses the last file).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_threads()

import numpy as np  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def decoders(**variants):
    """name -> Decoder with adapters 'a' and 'b'; a variant is (use the IOBinding path?, session-option
    overrides). The binding path is what non-CPU providers use; here it is forced on a CPU session."""
    from edgeft.bundle import Bundle
    from edgeft.device import ort as edgeft_ort
    from edgeft.device.decoder import Decoder

    bundle = Bundle.open(common.paths()["bundle"])
    out = {}
    for name, (binding, overrides) in variants.items():
        original = edgeft_ort.session_options

        def patched(threads=None, deterministic=True, _o=overrides, _orig=original):
            opts = _orig(threads, deterministic)
            for key, value in _o.items():
                setattr(opts, key, value)
            return opts

        edgeft_ort.session_options = patched
        try:
            d = Decoder(bundle, threads=common.THREADS)
        finally:
            edgeft_ort.session_options = original
        d._use_binding = binding
        d.add_adapter("a", common.paths()["adapter_a"])
        d.add_adapter("b", common.paths()["adapter_b"])
        out[name] = d
    return out


def decode_steps(decs: dict, context: int, steps: int) -> dict:
    """Median decode-step time at a fixed ``context`` for each decoder, interleaved step by step."""
    state = {}
    prompt = np.arange(10, 10 + context, dtype=np.int64)[None] % common.MODEL["vocab_size"]
    for name, d in decs.items():
        _, past = d.step(prompt, np.ones((1, context), np.int64), np.arange(context)[None], d.empty_past(), "a")
        state[name] = past
    times = {name: [] for name in decs}
    ids, mask, pos = np.array([[5]]), np.ones((1, context + 1), np.int64), np.array([[context]])
    for i in range(steps):
        order = list(decs) if i % 2 == 0 else list(reversed(decs))
        for name in order:
            t0 = time.perf_counter()
            decs[name].step(ids, mask, pos, state[name], "a")
            times[name].append(time.perf_counter() - t0)
    for d in decs.values():
        d._release()
    out = {
        name: {"median_ms": 1e3 * float(np.median(t)), "p10_ms": 1e3 * float(np.percentile(t, 10))}
        for name, t in times.items()
    }
    # Paired: each step of one variant against the adjacent step of the other (robust to load drift).
    a, b = list(decs)
    out["paired_diff_ms"] = 1e3 * float(np.median(np.array(times[a]) - np.array(times[b])))
    out["relative"] = out["paired_diff_ms"] / out[b]["median_ms"]
    return out


def same_tokens(decs: dict) -> bool:
    """Both step paths give the same greedy tokens, switching adapters between requests."""
    from edgeft.device.decoder import Sampling

    prompt = list(range(10, 60))
    runs = {
        name: [list(d.generate_ids(prompt, a, Sampling(max_new_tokens=12), set())) for a in ("a", "b", "base", "a")]
        for name, d in decs.items()
    }
    first, *rest = runs.values()
    return all(r == first for r in rest)


def switch_cost(d, repeats: int = 200) -> dict:
    """Direct cost of an adapter switch in Decoder: rebinding the LoRA OrtValues."""
    d._bind_adapter("a")
    d._bind_adapter("b")
    switch, same = [], []
    for i in range(repeats):
        name = "a" if i % 2 == 0 else "b"
        t0 = time.perf_counter()
        d._bind_adapter(name)  # differs from the one bound: a real switch
        switch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        d._bind_adapter(name)  # already bound: a no-op check
        same.append(time.perf_counter() - t0)
    d._release()
    return {
        "switch_us": 1e6 * float(np.median(switch)),
        "same_us": 1e6 * float(np.median(same)),
        "bound_inputs": len(d.lora_inputs),
    }


def train_options(seq: int = 128, warmup: int = 1, repeats: int = 4) -> dict:
    """Training session options at a short sequence: each variant in its own worker (own peak RSS),
    steps interleaved across the three workers."""
    from bench import Worker

    variants = {
        "current (memory pattern off)": {},
        "memory pattern on (ORT default)": {"enable_mem_pattern": True},
        "CPU arena off": {"enable_cpu_mem_arena": False},
    }
    workers = {
        name: Worker("train-edgeft", _logs(), "--seq", str(seq), env=_options_env(o), tag=f"-opt{k}")
        for k, (name, o) in enumerate(variants.items())
    }
    for w in workers.values():
        for _ in range(warmup):
            w.call("step")
    times = {name: [] for name in workers}
    for i in range(repeats):
        for name in list(workers) if i % 2 == 0 else list(reversed(workers)):
            times[name].append(workers[name].call("step")["seconds"])
    out = {}
    for name, w in workers.items():
        final = w.close()
        out[name] = {
            "median_s": float(np.median(times[name])),
            "min_s": min(times[name]),
            "peak_rss_mb": final["vm_hwm_mb"],
        }
    return {"seq": seq, "batch": 4, "variants": out}


def train_memory(seq: int = 512, steps: int = 2) -> dict:
    """Peak RSS with and without ORT's memory pattern at a long sequence. One process at a time
    (each needs several GB): the peak is deterministic, the step times are only indicative."""
    from bench import Worker

    variants = {"current (memory pattern off)": {}, "memory pattern on (ORT default)": {"enable_mem_pattern": True}}
    out = {}
    for k, (name, o) in enumerate(variants.items()):
        w = Worker("train-edgeft", _logs(), "--seq", str(seq), env=_options_env(o), tag=f"-mem{k}")
        w.call("step")
        times = [w.call("step")["seconds"] for _ in range(steps)]
        final = w.close()
        out[name] = {"median_s": float(np.median(times)), "min_s": min(times), "peak_rss_mb": final["vm_hwm_mb"]}
    return {"seq": seq, "batch": 4, "variants": out}


def _logs() -> Path:
    logs = common.paths()["root"] / "logs"
    logs.mkdir(exist_ok=True)
    return logs


def _options_env(overrides: dict) -> dict:
    return {"EDGEFT_BENCH_ORT_OPTIONS": json.dumps(overrides)}


def _profiling(prefix: Path):
    """Patch edgeft's session options to enable ORT's profiler; returns an undo function."""
    import edgeft.device.ort as edgeft_ort
    import edgeft.device.runtime as runtime

    original = edgeft_ort.session_options

    def patched(threads=None, deterministic=True):
        opts = original(threads, deterministic)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(prefix)
        return opts

    edgeft_ort.session_options = runtime.session_options = patched

    def undo():
        edgeft_ort.session_options = runtime.session_options = original

    return undo


def _op_table(path: Path, skip_runs: int) -> dict:
    """Kernel time per op type per run from an ORT profile, skipping the first ``skip_runs`` runs."""
    import collections

    events = json.loads(path.read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else 0
    n = max(1, len(runs) - skip_runs)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"].get("op_name")] += e["dur"]
    total = sum(per_op.values())
    return {
        "runs": n,
        "kernel_ms_per_run": total / 1e3 / n,
        "ops": [{"op": op, "ms_per_run": us / 1e3 / n, "share": us / total} for op, us in per_op.most_common(8)],
    }


def profile_train(seq: int = 128, steps: int = 3) -> dict:
    import gc

    from edgeft.bundle import Bundle
    from edgeft.device.adapter import load_adapter
    from edgeft.device.data import Batch
    from edgeft.device.runtime import LoraModel

    prefix = common.paths()["root"] / "logs" / "ortprof-train"
    prefix.parent.mkdir(exist_ok=True)
    for old in prefix.parent.glob("ortprof-train*.json"):
        old.unlink()
    undo = _profiling(prefix)
    try:
        bundle = Bundle.open(common.paths()["bundle"])
        model = LoraModel(bundle, load_adapter(common.paths()["adapter_a"], bundle), threads=common.THREADS)
        after_load = {"vm_rss_mb": common.vm_rss_mb(), "vm_hwm_mb": common.vm_hwm_mb()}
        ids = np.random.default_rng(0).integers(3, common.MODEL["vocab_size"], (4, seq))
        batch = Batch(ids, np.ones_like(ids), ids.copy(), 4 * (seq - 1), 4 * seq)
        for _ in range(steps):
            model.zero_grad()
            model.forward_backward(batch, float(batch.num_loss_tokens))
        del model
        gc.collect()  # the Module writes its profile when destroyed
    finally:
        undo()
    files = sorted(prefix.parent.glob("ortprof-train*.json"), key=lambda f: f.stat().st_size)
    return {"seq": seq, "batch": 4, "after_load": after_load, **_op_table(files[-1], skip_runs=1)}


def profile_decode(context: int = 128, steps: int = 20) -> dict:
    from edgeft.bundle import Bundle
    from edgeft.device.decoder import Decoder

    prefix = common.paths()["root"] / "logs" / "ortprof-decode"
    undo = _profiling(prefix)
    try:
        d = Decoder(Bundle.open(common.paths()["bundle"]), threads=common.THREADS)
    finally:
        undo()
    d.add_adapter("a", common.paths()["adapter_a"])
    prompt = np.arange(10, 10 + context, dtype=np.int64)[None]
    _, past = d.step(prompt, np.ones((1, context), np.int64), np.arange(context)[None], d.empty_past(), "a")
    for i in range(steps):
        _, past = d.step(np.array([[5]]), np.ones((1, context + i + 1), np.int64), np.array([[context + i]]), past, "a")
    path = Path(d.session.end_profiling())
    table = _op_table(path, skip_runs=1)
    path.unlink()
    return {"context": context, **table}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--contexts", default="128,1024,2048")
    args = parser.parse_args()
    common.ensure_cache(log)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average_at_start": list(os.getloadavg())}
    contexts = [int(c) for c in args.contexts.split(",")]

    log("IOBinding + OrtValue KV cache + pre-built LoRA OrtValues vs numpy feeds (decode step)")
    decs = decoders(iobinding=(True, {}), numpy_feeds=(False, {}))
    results["iobinding_same_tokens"] = same_tokens(decs)
    results["iobinding"] = {c: decode_steps(decs, c, args.steps) for c in contexts}
    results["switch"] = switch_cost(decs["iobinding"])
    for c, r in results["iobinding"].items():
        log(f"  context {c}: {r}")
    log(f"  adapter switch: {results['switch']}")
    del decs
    gc.collect()

    log("decoder session: memory pattern off vs on")
    decs = decoders(mem_pattern_off=(False, {"enable_mem_pattern": False}), mem_pattern_on=(False, {}))
    results["mem_pattern"] = {c: decode_steps(decs, c, args.steps) for c in contexts}
    for c, r in results["mem_pattern"].items():
        log(f"  context {c}: {r}")
    del decs
    gc.collect()

    log("training session options at seq 128 (three workers, steps interleaved)")
    results["train_options"] = train_options()
    for name, r in results["train_options"]["variants"].items():
        log(f"  {name}: {r}")
    log("training memory pattern at seq 512 (one process at a time)")
    results["train_memory"] = train_memory()
    for name, r in results["train_memory"]["variants"].items():
        log(f"  {name}: {r}")

    log("ORT profiles: one train step (seq 128) and decode steps (context 128), kernel time per op type")
    results["profile_train"] = profile_train()
    results["profile_decode"] = profile_decode()
    for key in ("profile_train", "profile_decode"):
        r = results[key]
        log(
            f"  {key}: {r['kernel_ms_per_run']:.1f} ms/run; "
            + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r["ops"][:4])
        )

    results["load_average_at_end"] = list(os.getloadavg())
    out = common.BENCH / "ab_results.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
