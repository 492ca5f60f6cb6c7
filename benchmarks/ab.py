"""A/B of the training engine's session options, an op profile and a memory trace, at one grid point.

    python benchmarks/ab.py [--quick] [--steps N]

The engine turns off pre-packing, constant folding and the memory pattern for memory
(``edgeft.device.runtime.graph_session``); each is measured here against that default through
``SessionConfig`` overrides (``EDGEFT_BENCH_SESSION``), fp32 and int4 bases. The default worker stays
alive and each variant's worker alternates steps with it, so at most two training workers are alive.
Then ORT's profiler over one edgeft step (kernel time per op type), the RSS of edgeft and torch
workers sampled every 5 ms through one step, and the decoder's IOBinding path against numpy feeds.
Writes benchmarks/ab_results.json, which RESULTS.md's optimisation section reads (run before
bench.py: `make bench` and `make bench-quick` do).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import common  # noqa: E402

common.set_threads()

# The grid point: (plan, model index, LoRA targets, seq).
POINTS = {"full": ("full", 1, "attn", 512), "quick": ("quick", 1, "attn", 128), "smoke": ("smoke", 0, "attn", 64)}
# SessionConfig overrides against graph_session()'s choices.
OPTIONS = {
    "pre-packing on (ORT default)": {"config_entries": {}},
    "constant folding on (ORT default)": {"disabled_optimizers": []},
    "memory pattern on (ORT default)": {"mem_pattern": True},
}
DEFAULT = "engine default (no pre-packing, no constant folding, no memory pattern)"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def point(mode: str):
    plan_name, index, targets, seq = POINTS[mode]
    plan = dict(bench.PLANS[plan_name], torch_attn="sdpa")
    specs = bench.model_specs(plan)
    bench.build(specs, plan, "recompute" in common.export_options(), rebuild=False)
    spec = specs[index]
    return spec, targets, seq, f"{spec['name']}, LoRA {targets}, seq {seq}, batch {common.BATCH}"


def edgeft_worker(spec, targets, seq, precision, env=None, tag=""):
    args = ["--seq", str(seq), *bench.worker_args("edgeft", spec, targets, precision)]
    return bench.Worker("train-edgeft", common.paths(spec, targets)["logs"], *args, env=env, tag=f"-ab{tag}")


def session_options_ab(spec, targets, seq, cell, precision: str, steps: int) -> dict:
    """Each option against the engine default, in its own worker, steps interleaved with the default's."""
    base = edgeft_worker(spec, targets, seq, precision, tag=f"-{precision}-default")
    variants, base_times = {}, []
    for k, (name, override) in enumerate(OPTIONS.items()):
        env = {"EDGEFT_BENCH_SESSION": json.dumps(override)}
        w = edgeft_worker(spec, targets, seq, precision, env=env, tag=f"-{precision}-opt{k}")
        mine, theirs = bench.alternate(w, base, "step", {}, 1, steps, warm_b=not base_times)
        base_times += [r["seconds"] for r in theirs]
        variants[name] = _summary([r["seconds"] for r in mine], w.close()["vm_hwm_mb"])
        log(f"  {precision} {name}: {variants[name]}")
    default = _summary(base_times, base.close()["vm_hwm_mb"])
    log(f"  {precision} {DEFAULT}: {default}")
    return {"cell": f"{cell}, {precision} base", "variants": {DEFAULT: default, **variants}}


def _summary(times: list[float], peak: float) -> dict:
    return {"median_s": common.median(times), "min_s": min(times), "peak_rss_mb": peak}


def profile_train(spec, targets, seq, cell, steps: int = 2) -> dict:
    """ORT's profiler over edgeft train steps (the first one skipped): kernel time per op type."""
    prefix = common.paths(spec, targets)["logs"] / "ortprof-train"
    for old in prefix.parent.glob("ortprof-train*.json"):
        old.unlink()
    w = edgeft_worker(spec, targets, seq, "fp32", env={"EDGEFT_BENCH_PROFILE": str(prefix)}, tag="-profile")
    for _ in range(steps + 1):
        w.call("step")
    path = Path(w.call("end_profiling")["path"])
    w.close()
    return {"cell": f"{cell}, fp32 base", **_op_table(path, skip_runs=1)}


def _op_table(path: Path, skip_runs: int) -> dict:
    events = json.loads(path.read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else 0
    n = max(1, len(runs) - skip_runs)
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"].get("op_name")] += e["dur"]
    total = sum(per_op.values()) or 1
    return {
        "runs": n,
        "kernel_ms_per_run": total / 1e3 / n,
        "ops": [{"op": op, "ms_per_run": us / 1e3 / n, "share": us / total} for op, us in per_op.most_common(10)],
    }


def memory_trace(w: bench.Worker, cell: str) -> dict:
    """RSS of the worker sampled every 5 ms through its first step, where every buffer is first
    allocated (edgeft opens its sessions there too; later steps reuse the arena, so RSS stays flat),
    then VmHWM after a second step."""
    after_load = w.ready["vm_rss_mb"]
    samples, done = [], threading.Event()
    status = Path(f"/proc/{w.proc.pid}/status")

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mb(status)))
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    t0 = time.perf_counter()
    thread.start()
    w.call("step")
    done.set()
    thread.join()
    t1 = time.perf_counter()
    w.call("step")
    peak_t, peak = max(samples, key=lambda s: s[1])
    return {
        "cell": cell,
        "after_load_mb": after_load,
        "peak_mb": peak,
        "peak_at": (peak_t - t0) / (t1 - t0),
        "after_mb": samples[-1][1],
        "peak_two_steps_mb": w.close()["vm_hwm_mb"],
        "samples": len(samples),
        "trace": [(round(t - t0, 4), round(m, 1)) for t, m in samples[:: max(1, len(samples) // 400)]],
    }


def _rss_mb(status: Path) -> float:
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_traces(spec, targets, seq, cell) -> dict:
    out = {}
    no_arena = {"EDGEFT_BENCH_ORT_OPTIONS": json.dumps({"enable_cpu_mem_arena": False})}
    for precision in ("fp32", "int4"):
        out[f"edgeft {precision} base"] = memory_trace(
            edgeft_worker(spec, targets, seq, precision, tag=f"-trace-{precision}"), cell
        )
        # Without the arena freed blocks go back to malloc, so RSS follows the live tensors more
        # closely: the difference is what the arena keeps (diagnostic; SessionConfig has no such field).
        out[f"edgeft {precision} base, CPU arena off"] = memory_trace(
            edgeft_worker(spec, targets, seq, precision, env=no_arena, tag=f"-trace-{precision}-noarena"), cell
        )
    torch_args = ["--seq", str(seq), *bench.worker_args("torch", spec, targets)]
    torch = bench.Worker("train-torch", common.paths(spec, targets)["logs"], *torch_args, tag="-ab-trace")
    out["torch + PEFT fp32"] = memory_trace(torch, cell)
    for name, m in out.items():
        log(
            f"  {name}: after load {m['after_load_mb']:.0f} MB, peak {m['peak_mb']:.0f} MB at {m['peak_at']:.2f} of the step"
        )
    return out


def iobinding(spec, targets, contexts: list[int], steps: int) -> dict:
    """The decoder's IOBinding path (non-CPU providers use it) forced on CPU, against numpy feeds."""
    p = common.paths(spec, targets)
    args = ["--bundle", str(p["bundle"]), "--adapter", str(p["adapter_a"]), "--adapter-b", str(p["adapter_b"])]
    w = bench.Worker("decode-edgeft", p["logs"], *args, tag="-ab-binding")
    out = {"contexts": {c: w.call("binding_ab", context=c, steps=steps) for c in contexts}}
    out["same_tokens"] = w.call("binding_same_tokens")["same"]
    w.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plan", choices=sorted(POINTS), default="full")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: 4 full, 2 quick)")
    parser.add_argument("--out", type=Path, default=common.BENCH / "ab_results.json")
    args = parser.parse_args()
    mode = "quick" if args.quick else args.plan
    steps = args.steps or (4 if mode == "full" else 2)
    bench.check_pythons()
    spec, targets, seq, cell = point(mode)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": mode, "load_average_at_start": list(os.getloadavg())}
    for precision in ("fp32", "int4"):
        log(f"session options against the engine default, {precision} base ({cell})")
        results[f"train_options_{precision}"] = session_options_ab(spec, targets, seq, cell, precision, steps)
    log("ORT profile of an edgeft train step")
    results["profile_train"] = profile_train(spec, targets, seq, cell)
    log("memory traces through one step")
    results["memory_trace"] = memory_traces(spec, targets, seq, cell)
    log("decoder: IOBinding path vs numpy feeds")
    contexts = [128, 1024] if mode == "full" else [64]
    results["iobinding"] = iobinding(spec, targets, contexts, 30 if mode == "full" else 10)
    results["load_average_at_end"] = list(os.getloadavg())
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
