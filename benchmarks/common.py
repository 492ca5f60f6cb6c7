"""Shared pieces of the benchmarks: the cached Phi-3-shaped model + bundle, machine facts,
roofline probes (sgemm peak, memory read bandwidth) and small statistics helpers.

Run ``python benchmarks/common.py build`` to (re)build the cache by hand; ``bench.py`` does it
on demand. Nothing here imports torch at module level: the edgeft workers import this module
and must stay torch-free so their peak RSS is edgeft's alone.
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
LORA_TARGETS = ["qkv_proj", "o_proj"]
LORA_R, LORA_ALPHA = 8, 16
# Phi-3-mini's layout (fused qkv / gate_up, 32064 vocab) at ~110M-class width: hidden 768, 12 layers.
MODEL = dict(
    vocab_size=32064,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=12,
    max_position_embeddings=4096,
)
MAX_SEQ_LEN = 4096  # the bundle's context: room for the 2048-token decode scaling point + 128 new


def set_threads(n: int = THREADS) -> None:
    """Thread counts for every library, before any of them is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def cache_key() -> str:
    """Shapes + bundle format version. Not the export sources: several people edit them at once and
    a rebuild costs minutes; a bundle this edgeft can no longer open is rebuilt (see ensure_cache),
    and ``bench.py --rebuild`` forces one."""
    from edgeft.bundle import FORMAT_VERSION

    h = hashlib.sha256(json.dumps([MODEL, MAX_SEQ_LEN, LORA_TARGETS, LORA_R, LORA_ALPHA, FORMAT_VERSION]).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return CACHE / f"phi3-bench-{cache_key()}"


def paths(root: Path | None = None) -> dict[str, Path]:
    root = root or cache_dir()
    return {
        "root": root,
        "model": root / "model",
        "bundle": root / "bundle",
        "adapter_a": root / "adapter-a",
        "adapter_b": root / "adapter-b",
        "meta": root / "meta.json",
    }


def load_meta() -> dict | None:
    p = paths()["meta"]
    return json.loads(p.read_text()) if p.is_file() else None


def ensure_cache(log=print, rebuild: bool = False) -> dict:
    """Build model, bundle and two adapters once (keyed on shapes + format version); return meta."""
    meta = None if rebuild else load_meta()
    if meta is not None:
        try:
            from edgeft.bundle import Bundle

            bundle = Bundle.open(paths()["bundle"])
            if "decoder_lora" not in bundle.manifest["graphs"]:
                raise ValueError("no decoder graph")
            return meta
        except Exception as e:  # noqa: BLE001 - any failure to open means: stale, rebuild
            log(f"cached bundle is stale ({e}); rebuilding")
    import subprocess

    log(f"building the benchmark model and bundle in {cache_dir()} (first run only)")
    env = dict(os.environ)
    set_threads()
    env.update({k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
    # Its own process: the export's memory never inflates the benchmark process.
    subprocess.run([sys.executable, str(Path(__file__)), "build"], check=True, env=env)
    return load_meta()


def _build() -> None:
    import shutil
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Phi3Config

    from edgeft.host.export import ExportConfig, export_bundle
    from edgeft.host.tiny import train_tokenizer

    torch.set_num_threads(THREADS)
    final = cache_dir()
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob("phi3-bench-*"):  # one cached build at a time: each is ~1.5 GB
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    p = paths(stage)
    train_tokenizer(p["model"], vocab_size=512, model_max_length=MAX_SEQ_LEN)
    tok = Tokenizer.from_file(str(p["model"] / "tokenizer.json"))
    ids = {n: tok.token_to_id(n) for n in ("<s>", "</s>", "<pad>")}
    config = Phi3Config(**MODEL, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(p["model"], safe_serialization=True)
    n_params = sum(t.numel() for t in model.parameters())
    for name, seed in (("adapter_a", 1), ("adapter_b", 2)):
        lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        peft = get_peft_model(model, lora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, t in peft.named_parameters():
                if "lora_B" in n:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        peft.save_pretrained(p[name])
        model = peft.unload()
    del model
    t0 = time.perf_counter()
    export_bundle(
        ExportConfig(
            p["model"],
            p["bundle"],
            lora_r=LORA_R,
            lora_alpha=LORA_ALPHA,
            target_modules=LORA_TARGETS,
            max_seq_len=MAX_SEQ_LEN,
        )
    )
    export_s = time.perf_counter() - t0
    meta = {
        "key": cache_key(),
        "built": time.strftime("%Y-%m-%d %H:%M:%S"),
        "export_seconds": export_s,
        "export_peak_rss_mb": vm_hwm_mb(),
        "n_params": n_params,
        "config": MODEL,
        "max_seq_len": MAX_SEQ_LEN,
    }
    (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    # Adapter and model paths inside meta are relative, so renaming the staging dir is fine.
    print(f"built {final} (export {export_s:.1f}s)")


# ---------------------------------------------------------------------------------------------
# Model arithmetic


def model_facts(model_dir: Path) -> dict:
    """Parameter counts from the saved weights' header (no torch): matmul and per-token bytes."""
    import struct

    with open(model_dir / "model.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    numel = {k: _prod(s) for k, s in shapes.items()}
    total = sum(numel.values())
    embed = sum(n for k, n in numel.items() if "embed_tokens" in k)
    matmul = sum(n for k, n in numel.items() if len(shapes[k]) == 2 and "embed_tokens" not in k)
    layers = MODEL["num_hidden_layers"]
    h, i = MODEL["hidden_size"], MODEL["intermediate_size"]
    # LoRA r on qkv (h -> 3h) and o (h -> h): A [r, h] + B [out, r].
    lora = layers * (LORA_R * h + 3 * h * LORA_R + LORA_R * h + h * LORA_R)
    assert i  # (documented shape)
    return {
        "params_total": total,
        "params_embedding": embed,
        "params_matmul": matmul,  # every Linear incl. lm_head; the embedding is a gather
        "params_lora": lora,
        "fp32_weight_bytes": 4 * total,
        # A decode step reads every matmul weight once (+ LoRA); the embedding row is negligible.
        "decode_weight_bytes_per_token": 4 * (matmul + lora),
    }


def kv_bytes(context: int) -> int:
    """KV-cache bytes one decode step reads at ``context`` tokens (fp32, all layers, K and V)."""
    return 4 * 2 * MODEL["num_hidden_layers"] * MODEL["hidden_size"] * context


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
    for pkg in ("edgeft", "onnxruntime-training-cpu", "torch", "transformers", "peft", "numpy", "safetensors"):
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
    if sys.argv[1:] == ["build"]:
        set_threads()
        _build()
    elif sys.argv[1:] == ["probe"]:
        set_threads()
        print(json.dumps({"sgemm": sgemm_peak(), "bandwidth": read_bandwidth()}, indent=2))
    else:
        print(__doc__)
