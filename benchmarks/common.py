"""Shared pieces of the benchmarks: the grid's model shapes and LoRA target sets, where each built
model / bundle / artifact lives in the cache, which python runs which worker, machine facts,
roofline probes and small statistics helpers.

Nothing here imports torch: the edgeft workers import this module in the device venv, which has
no torch, so their peak RSS is edgeft's alone. Building (torch, PEFT, export) is in build.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
CACHE = Path(os.environ.get("EDGEFT_BENCH_CACHE", BENCH / ".cache"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

THREADS = 2
BATCH = 4
LORA_R, LORA_ALPHA = 8, 16
VOCAB = 32000  # a ~32k vocabulary (the lm_head and the loss are a real share of a step), far larger
# than the 512-token tokenizer: the benchmark batches are random ids over the whole vocabulary.
MAX_SEQ_LEN = 2048  # the bundles' context: training seq 1024, decode prompts up to 512 + new tokens

# Module names per layout: "attn" = LoRA on the attention projections, "all" = on every linear layer
# of the blocks (lm_head excluded, as PEFT's "all-linear" does).
LAYOUTS = {
    "llama": {
        "config": "LlamaConfig",
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
    },
    "phi3": {"config": "Phi3Config", "attn": ["qkv_proj", "o_proj"], "mlp": ["gate_up_proj", "down_proj"]},
}


def model_spec(layout: str, mlp_ratio: int, layers: int, hidden: int = 768, heads: int = 12) -> dict:
    """One model of the grid: random weights, ``intermediate = mlp_ratio x hidden``, untied lm_head."""
    config = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=mlp_ratio * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=MAX_SEQ_LEN,
        tie_word_embeddings=False,
    )
    return {
        "name": f"{layout}-h{hidden}-l{layers}-mlp{mlp_ratio}",
        "layout": layout,
        "mlp_ratio": mlp_ratio,
        "config": config,
    }


def lora_targets(layout: str, targets: str) -> list[str]:
    spec = LAYOUTS[layout]
    return spec["attn"] + (spec["mlp"] if targets == "all" else [])


def set_threads(n: int = THREADS) -> None:
    """Thread counts for every library, before any of them is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# ---------------------------------------------------------------------------------------------
# Cache layout: CACHE/<model>-<key>/{model, adapter-<targets>-{a,b}, bundle-<targets>-<precision>-<recompute>,
# ort119-<targets>}. Keyed on the shapes and the bundle format version, not on the export sources
# (several people edit them at once and a rebuild costs minutes): a bundle this edgeft can no longer
# open is rebuilt (build.py checks), and ``bench.py --rebuild`` forces it.


def model_dir(spec: dict) -> Path:
    from edgeft.bundle import FORMAT_VERSION

    shape = {k: spec[k] for k in ("name", "layout", "mlp_ratio", "config")}  # not the grid around it
    key = json.dumps([shape, LORA_R, LORA_ALPHA, FORMAT_VERSION], sort_keys=True)
    return CACHE / f"{spec['name']}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def paths(spec: dict, targets: str, precision: str = "fp32", recompute: str = "none") -> dict[str, Path]:
    root = model_dir(spec)
    return {
        "root": root,
        "model": root / "model",
        "adapter_a": root / f"adapter-{targets}-a",
        "adapter_b": root / f"adapter-{targets}-b",
        "bundle": root / f"bundle-{targets}-{precision}-{recompute}",
        "ort119": root / f"ort119-{targets}",
        "logs": root / "logs",
    }


def export_options() -> set[str]:
    """ExportConfig's fields in this checkout: ``recompute`` is measured only where it exists."""
    import dataclasses

    from edgeft.host.export import ExportConfig

    return {f.name for f in dataclasses.fields(ExportConfig)}


def device_python() -> Path:
    """The device venv's python (plain onnxruntime, no torch): the edgeft workers run there."""
    env = os.environ.get("EDGEFT_BENCH_DEVICE_PYTHON")
    return Path(env) if env else ROOT / ".venv-device" / "bin" / "python"


def host_python() -> Path:
    """The host venv's python (torch, PEFT, onnxruntime-training 1.19): the reference workers."""
    env = os.environ.get("EDGEFT_BENCH_HOST_PYTHON")
    return Path(env) if env else ROOT / ".venv" / "bin" / "python"


def model_facts(spec: dict, targets: str) -> dict:
    """Parameter counts from the config: matmul parameters (every Linear incl. lm_head; the
    embedding is a gather) set the FLOPs of a step, 4 x (matmul + LoRA) x tokens for a LoRA step
    (forward, input gradient, the LoRA weight gradients being negligible)."""
    c = spec["config"]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    attn, mlp = 4 * h * h, 3 * h * i
    shapes = {"attn": [(h, h)] * 4, "mlp": [(h, i), (h, i), (i, h)]}
    if spec["layout"] == "phi3":  # fused qkv_proj and gate_up_proj: one LoRA pair each
        shapes = {"attn": [(h, 3 * h), (h, h)], "mlp": [(h, 2 * i), (i, h)]}
    lora_shapes = shapes["attn"] + (shapes["mlp"] if targets == "all" else [])
    lora = n * sum(LORA_R * (a + b) for a, b in lora_shapes)
    matmul = n * (attn + mlp) + h * v
    return {
        "params_total": matmul + h * v + n * 2 * h + h,
        "params_matmul": matmul,
        "params_lora": lora,
        "fp32_weight_bytes": 4 * (matmul + h * v + n * 2 * h + h),
        # A decode step reads every matmul weight once (+ LoRA): the bandwidth roofline.
        "decode_weight_bytes_per_token": 4 * (matmul + lora),
    }


# ---------------------------------------------------------------------------------------------
# Machine


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(
                    f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have
                )
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("edgeft", "onnxruntime", "onnxruntime-training-cpu", "torch", "transformers", "peft", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def vm_hwm_mb() -> float:
    """Peak RSS of this process (VmHWM: starts afresh at exec, unlike ru_maxrss across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sgemm_peak(n: int = 3072, tries: int = 5) -> dict:
    """Best numpy float32 matmul rate (GFLOP/s) on n x n matrices, with THREADS BLAS threads."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "tries": tries, "seconds_best": best}


def read_bandwidth(gb: float = 1.0, tries: int = 5) -> dict:
    """Best memory read bandwidth (GB/s): numpy sum over a ``gb`` GB float32 array, on one thread
    and on THREADS threads (each summing its slice; numpy releases the GIL), best of ``tries``."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    x = np.ones(int(gb * 1e9) // 4, np.float32)
    x.sum()  # fault the pages in
    nbytes = x.nbytes

    def timed(fn):
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    one = timed(lambda: x.sum())
    parts = np.array_split(x, THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        multi = timed(lambda: list(pool.map(np.sum, parts)))
    return {"gbps": max(one, multi), "gbps_1_thread": one, f"gbps_{THREADS}_threads": multi, "array_gb": gb}


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, machine busy CPU-seconds incl. steal from /proc/stat, this process + its reaped children)."""
    busy = float("nan")
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def background_cores(start: tuple[float, float, float], end: tuple[float, float, float]) -> float:
    """Cores other processes kept busy on average between two snapshots (the benchmark's own
    processes, workers included once reaped, subtracted): how contended a measurement was."""
    wall = end[0] - start[0]
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall) if wall > 0 else float("nan")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


if __name__ == "__main__":
    if sys.argv[1:] == ["probe"]:
        set_threads()
        print(json.dumps({"sgemm": sgemm_peak(), "bandwidth": read_bandwidth()}, indent=2))
    else:
        print(__doc__)
