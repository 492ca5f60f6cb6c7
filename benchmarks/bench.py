"""edgeft vs torch + PEFT (and the onnxruntime-training 1.19 engine it replaced), over a grid.

    python benchmarks/bench.py [--quick] [--rebuild] [--repeats N] [--only-build]

The grid is data (PLANS): models (MLP ratio 2x / 4x hidden) x LoRA targets (attention / all
linear layers) x sequence lengths, and per cell the edgeft variants (fp32 / int8 / int4 base x
recompute none / layers) and, on a sub-grid, the 1.19 engine. Per cell one torch + PEFT worker
(eager fp32, sdpa) stays alive, and each variant's worker in turn alternates steps with it (which
goes first alternates too), so every ratio compares two processes measured at the same time;
at most two training workers are alive at once. Peak RSS = each worker's VmHWM. Then decode
(TextGenerator vs transformers generate, same LoRA settings), the adapter switch, and
``edgeft train`` through the CLI against the equivalent torch script (eval loss after N steps per
base precision). Writes results.json, RESULTS.md and scaling.png next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402

common.set_threads()

PRECISIONS = ["fp32", "int8", "int4"]
RECOMPUTE = ["none", "layers"]
FULL = {
    "mode": "full",
    # layout, MLP ratio (intermediate = ratio x hidden 768), layers; optional per-model overrides.
    "models": [
        {"layout": "llama", "mlp_ratio": 2, "layers": 8},
        {"layout": "llama", "mlp_ratio": 4, "layers": 8},
        # Phi-3's fused qkv / gate_up layout at one point: its split outputs cost activation memory.
        {"layout": "phi3", "mlp_ratio": 4, "layers": 8, "seqs": [512], "targets": ["attn"], "precisions": ["fp32"]},
    ],
    "targets": ["attn", "all"],
    "seqs": [128, 512, 1024],
    "precisions": PRECISIONS,
    "recompute": RECOMPUTE,
    # The 1.19 engine (fp32 only): llama models, attention LoRA.
    "ort119": {"layouts": ["llama"], "targets": ["attn"], "seqs": [128, 512, 1024]},
    "train_warmup": 1,
    "train_repeats": 3,
    "decode": {"layouts": ["llama"], "prompt": 128, "new_tokens": 64, "precisions": PRECISIONS},
    "decode_warmup": 1,
    "decode_repeats": 3,
    "switch_prompt": 8,
    "switch_repeats": 30,
    "session_repeats": 2,
    # edgeft train (CLI) vs torch_train.py, one per base precision: eval loss after N steps.
    "eval_check": {"model": 0, "targets": "all", "steps": 200},
}
QUICK = {
    **FULL,
    "mode": "quick",
    "models": [
        {"layout": "llama", "mlp_ratio": 2, "layers": 2},
        {"layout": "llama", "mlp_ratio": 4, "layers": 2},
    ],
    "seqs": [128],
    "ort119": {"layouts": ["llama"], "targets": ["attn"], "seqs": [128]},
    "train_repeats": 2,
    "decode": {"layouts": ["llama"], "prompt": 64, "new_tokens": 24, "precisions": ["fp32"]},
    "decode_repeats": 2,
    "switch_repeats": 10,
    "session_repeats": 1,
    "eval_check": {"model": 0, "targets": "all", "steps": 40},
}
# The full grid's fp32 half at full size (8-layer models, seq 128 / 512 / 1024, recompute none and
# layers, both LoRA target sets): its fp32 targets in well under an hour, where the whole grid with
# int8 / int4 bases takes hours on 2 cores. `bench.py --plan fp32 --out benchmarks/fp32-grid`.
FP32 = {
    **FULL,
    "mode": "fp32",
    "models": FULL["models"][:2],
    "precisions": ["fp32"],
    "ort119": {"layouts": [], "targets": [], "seqs": []},
    "train_repeats": 2,
    "decode": {**FULL["decode"], "precisions": ["fp32"]},
    "eval_check": {"model": 0, "targets": "all", "steps": 40},
}
# A smoke test of the harness itself (tiny models, minutes): `bench.py --plan smoke`. Its figures mean nothing.
SMOKE = {
    **QUICK,
    "mode": "smoke",
    "models": [
        {"layout": "llama", "mlp_ratio": 2, "layers": 1, "hidden": 192, "heads": 4},
        {"layout": "llama", "mlp_ratio": 4, "layers": 1, "hidden": 192, "heads": 4},
    ],
    "seqs": [64, 128],
    "ort119": {"layouts": ["llama"], "targets": ["attn"], "seqs": [64]},
    "train_repeats": 1,
    "decode": {"layouts": ["llama"], "prompt": 16, "new_tokens": 8, "precisions": ["fp32", "int4"]},
    "decode_repeats": 1,
    "switch_repeats": 3,
    "eval_check": {"model": 0, "targets": "all", "steps": 5},
}
PLANS = {"full": FULL, "quick": QUICK, "fp32": FP32, "smoke": SMOKE}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Workers


class Worker:
    """A worker.py process: one JSON command per line in, one JSON answer per line out."""

    def __init__(self, kind: str, log_dir: Path, *args: str, env: dict | None = None, tag: str = ""):
        self.kind = kind
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{kind}{tag}.log"
        python = common.device_python() if kind.endswith("edgeft") else common.host_python()
        self.proc = subprocess.Popen(
            [str(python), str(common.BENCH / "worker.py"), kind, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-3000:]
            raise RuntimeError(f"{self.kind} worker died (exit {self.proc.returncode}); its log ends:\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.kind} worker: {answer['error']} (log: {self.log})")
        return answer

    def call(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died (e.g. killed for memory): report it like any worker failure
            return self._read()
        return self._read()

    def close(self) -> dict:
        """Final memory figures (VmHWM = peak RSS over the worker's whole life)."""
        final = self.call("quit")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        return final

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def alternate(
    a: Worker, b: Worker, op: str, kw: dict, warmup: int, repeats: int, warm_b: bool = True
) -> tuple[list, list]:
    """Warm up (``b`` only if ``warm_b``: a reference already warmed for an earlier variant), then
    repeats of (a, b) / (b, a) alternately: drift and background load fall on both alike."""
    for w in (a, b) if warm_b else (a,):
        for _ in range(warmup):
            w.call(op, **kw)
    ra, rb = [], []
    for i in range(repeats):
        for w in (a, b) if i % 2 == 0 else (b, a):
            (ra if w is a else rb).append(w.call(op, **kw))
    return ra, rb


def steps(w: Worker, warmup: int, repeats: int) -> list[dict]:
    for _ in range(warmup):
        w.call("step")
    return [w.call("step") for _ in range(repeats)]


def med(results: list[dict], key: str) -> float:
    return common.median([r[key] for r in results])


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


# ---------------------------------------------------------------------------------------------
# The grid as data


def model_specs(plan: dict) -> list[dict]:
    out = []
    for m in plan["models"]:
        spec = common.model_spec(m["layout"], m["mlp_ratio"], m["layers"], m.get("hidden", 768), m.get("heads", 12))
        spec["grid"] = {
            "seqs": m.get("seqs", plan["seqs"]),
            "targets": m.get("targets", plan["targets"]),
            "precisions": m.get("precisions", plan["precisions"]),
        }
        out.append(spec)
    return out


def variants(spec: dict, plan: dict, recompute_available: bool) -> list[dict]:
    """The edgeft variants of a model; recompute cells are kept (as not available) when this
    checkout's ExportConfig has no ``recompute`` field, so the table shows the gap."""
    out = []
    for r in plan["recompute"]:
        for p in spec["grid"]["precisions"]:
            v = {"engine": "edgeft", "precision": p, "recompute": r}
            if r != "none" and not recompute_available:
                v["unavailable"] = "not available yet (ExportConfig has no recompute field)"
            out.append(v)
    return out


def cells(specs: list[dict], plan: dict, recompute_available: bool) -> list[dict]:
    """Every (model, LoRA targets, seq) with its contenders besides torch."""
    out = []
    o = plan["ort119"]
    for spec in specs:
        for targets in spec["grid"]["targets"]:
            for seq in spec["grid"]["seqs"]:
                vs = variants(spec, plan, recompute_available)
                if spec["layout"] in o["layouts"] and targets in o["targets"] and seq in o["seqs"]:
                    vs.append({"engine": "ort119", "precision": "fp32", "recompute": "none"})
                out.append({"spec": spec, "targets": targets, "seq": seq, "variants": vs})
    return out


def build_jobs(specs: list[dict], plan: dict, recompute_available: bool) -> list[dict]:
    """What build.py must make for each model: adapters, bundles, 1.19 artifacts."""
    jobs = []
    o = plan["ort119"]
    for spec in specs:
        targets = spec["grid"]["targets"]
        bundles = [
            {"targets": t, "precision": v["precision"], "recompute": v["recompute"]}
            for t in targets
            for v in variants(spec, plan, recompute_available)
            if "unavailable" not in v
        ]
        ort119 = [t for t in targets if spec["layout"] in o["layouts"] and t in o["targets"]]
        jobs.append(
            {
                "spec": {k: v for k, v in spec.items() if k != "grid"},
                "adapters": targets,
                "bundles": bundles,
                "ort119": ort119,
            }
        )
    return jobs


def build(specs: list[dict], plan: dict, recompute_available: bool, rebuild: bool) -> dict:
    """Run build.py per model (its own process: the export's memory never inflates this one)."""
    built = {}
    for job in build_jobs(specs, plan, recompute_available):
        root = common.model_dir(job["spec"])
        if rebuild and root.exists():
            import shutil

            shutil.rmtree(root)
        log(f"building (cached after the first run) {root.name}")
        out = subprocess.run(
            [str(common.host_python()), str(common.BENCH / "build.py"), json.dumps(job)],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        built[job["spec"]["name"]] = json.loads(out.stdout.strip().splitlines()[-1])
    return built


def worker_args(engine: str, spec: dict, targets: str, precision: str = "fp32", recompute: str = "none") -> list[str]:
    p = common.paths(spec, targets, precision, recompute)
    if engine == "edgeft":
        return ["--bundle", str(p["bundle"]), "--adapter", str(p["adapter_a"])]
    if engine == "ort119":
        return ["--artifacts", str(p["ort119"])]
    return ["--model", str(p["model"]), "--adapter", str(p["adapter_a"])]


# ---------------------------------------------------------------------------------------------
# Training


def bench_cell(cell: dict, plan: dict, history: list[dict]) -> dict:
    """One (model, targets, seq): torch alive throughout, each variant alternating with it."""
    spec, targets, seq = cell["spec"], cell["targets"], cell["seq"]
    logs = common.paths(spec, targets)["logs"]
    tag = f"-{targets}-{seq}"
    row = {"model": spec["name"], "layout": spec["layout"], "mlp_ratio": spec["mlp_ratio"], "targets": targets}
    row.update(
        seq=seq, batch=common.BATCH, tokens=common.BATCH * seq, variants=[], load_average_1m=[os.getloadavg()[0]]
    )
    cpu0 = common.cpu_snapshot()
    sequential = not fits_side_by_side(cell, history)
    row["side_by_side"] = not sequential
    log(f"train {spec['name']} LoRA {targets} seq {seq}: {'one after the other' if sequential else 'side by side'}")
    torch_args = ["--seq", str(seq), "--attn", plan["torch_attn"], *worker_args("torch", spec, targets)]
    try:
        torch = Worker("train-torch", logs, *torch_args, tag=tag)
    except RuntimeError as e:  # no reference, no ratios: record the cell and go on
        log(f"  torch + PEFT: FAILED {str(e)[:300]}")
        row.update(status=f"failed: torch worker: {str(e)[:500]}", torch_peak_rss_mb=float("nan"))
        row["variants"] = [
            {**{k: v[k] for k in ("engine", "precision", "recompute")}, "status": "no reference"}
            for v in cell["variants"]
        ]
        return row
    row["torch_load"] = torch.ready
    torch_alone = steps(torch, plan["train_warmup"], plan["train_repeats"]) if sequential else None
    if sequential:
        row["torch_final"] = torch.close()
    for v in cell["variants"]:
        warm = not any(x.get("status") == "measured" for x in row["variants"])  # torch's first partner only
        row["variants"].append(bench_variant(v, cell, plan, None if sequential else torch, torch_alone, tag, warm))
    if not sequential:
        row["torch_final"] = torch.close()
    row["torch_peak_rss_mb"] = row["torch_final"]["vm_hwm_mb"]
    for v in row["variants"]:
        if "peak_rss_mb" in v:
            v["rss_ratio"] = v["peak_rss_mb"] / row["torch_peak_rss_mb"]
    row["background_cores"] = common.background_cores(cpu0, common.cpu_snapshot())
    row["load_average_1m"].append(os.getloadavg()[0])
    return row


def bench_variant(
    v: dict, cell: dict, plan: dict, torch: Worker | None, torch_alone: list | None, tag: str, warm_torch: bool
) -> dict:
    out = {k: v[k] for k in ("engine", "precision", "recompute")}
    if "unavailable" in v:
        out["status"] = v["unavailable"]
        return out
    spec, targets, seq = cell["spec"], cell["targets"], cell["seq"]
    kind = "train-edgeft" if v["engine"] == "edgeft" else "train-ort119"
    args = ["--seq", str(seq), *worker_args(v["engine"], spec, targets, v["precision"], v["recompute"])]
    t0 = time.perf_counter()
    w = None
    try:
        w = Worker(kind, common.paths(spec, targets)["logs"], *args, tag=f"{tag}-{v['precision']}-{v['recompute']}")
        if torch is not None:
            mine, theirs = alternate(w, torch, "step", {}, plan["train_warmup"], plan["train_repeats"], warm_torch)
        else:
            mine, theirs = steps(w, plan["train_warmup"], plan["train_repeats"]), torch_alone
        final = w.close()
    except RuntimeError as e:  # a variant that fails is recorded, the grid goes on
        if w is not None:
            w.kill()
        log(f"  {v['engine']} {v['precision']} recompute {v['recompute']}: FAILED {str(e)[:300]}")
        return {**out, "status": f"failed: {str(e)[:500]}"}
    out.update(
        status="measured",
        seconds=[r["seconds"] for r in mine],
        forward_backward_seconds=[r["forward_backward_seconds"] for r in mine],
        torch_seconds=[r["seconds"] for r in theirs],
        median_s=med(mine, "seconds"),
        torch_median_s=med(theirs, "seconds"),
        loss=mine[-1]["loss"],
        torch_loss=theirs[-1]["loss"],
        load=w.ready,
        peak_rss_mb=final["vm_hwm_mb"],
        wall_seconds=time.perf_counter() - t0,
    )
    out["time_ratio"] = out["median_s"] / out["torch_median_s"]
    log(
        f"  {v['engine']} {v['precision']} recompute {v['recompute']}: {out['median_s']:.2f}s vs torch "
        f"{out['torch_median_s']:.2f}s (x{out['time_ratio']:.2f}); peak RSS {out['peak_rss_mb']:.0f} MB"
    )
    return out


def fits_side_by_side(cell: dict, history: list[dict]) -> bool:
    """Whether torch and the largest variant fit in the memory available now, predicted from the
    same model and targets at the longest shorter seq (peaks scaled by the seq ratio, +30 %)."""
    prior = [
        r
        for r in history
        if r["model"] == cell["spec"]["name"] and r["targets"] == cell["targets"] and r["seq"] < cell["seq"]
    ]
    if not prior:
        return True
    last = max(prior, key=lambda r: r["seq"])
    peaks = [v["peak_rss_mb"] for v in last["variants"] if "peak_rss_mb" in v] or [0.0]
    need = 1.3 * (last["torch_peak_rss_mb"] + max(peaks)) * cell["seq"] / last["seq"]
    return need < mem_available_mb()


# ---------------------------------------------------------------------------------------------
# Decode and adapter switch


def bench_decode(specs: list[dict], plan: dict) -> list[dict]:
    d = plan["decode"]
    rows = []
    for spec in specs:
        if spec["layout"] not in d["layouts"]:
            continue
        for targets in spec["grid"]["targets"]:
            torch = Worker(
                "decode-torch",
                common.paths(spec, targets)["logs"],
                *worker_args("torch", spec, targets),
                tag=f"-{targets}",
            )
            for precision in d["precisions"]:
                rows.append(decode_pair(spec, targets, precision, torch, plan))
            torch.close()
    return rows


def decode_pair(spec: dict, targets: str, precision: str, torch: Worker, plan: dict) -> dict:
    d = plan["decode"]
    p = common.paths(spec, targets, precision)
    args = ["--bundle", str(p["bundle"]), "--adapter", str(p["adapter_a"]), "--adapter-b", str(p["adapter_b"])]
    e = Worker("decode-edgeft", p["logs"], *args, tag=f"-{targets}-{precision}")
    kw = {"prompt_len": d["prompt"], "new_tokens": d["new_tokens"]}
    re_, rt = alternate(e, torch, "generate", kw, plan["decode_warmup"], plan["decode_repeats"])
    row = {"model": spec["name"], "mlp_ratio": spec["mlp_ratio"], "targets": targets, "precision": precision}
    row.update(decode_row(d["prompt"], d["new_tokens"], re_, rt))
    row["edgeft_peak_rss_mb"] = e.close()["vm_hwm_mb"]
    log(
        f"decode {spec['name']} LoRA {targets} {precision}: edgeft {row['edgeft_tokens_per_second']:.1f} tok/s, "
        f"transformers {row['torch_tokens_per_second']:.1f} tok/s (x{row['tokens_per_second_ratio']:.2f})"
    )
    return row


def decode_row(prompt: int, n: int, re_: list[dict], rt: list[dict]) -> dict:
    row = {
        "prompt_len": prompt,
        "new_tokens": n,
        "edgeft_tokens_per_second_all": [r["tokens_per_second"] for r in re_],
        "torch_tokens_per_second_all": [r["tokens_per_second"] for r in rt],
        "edgeft_tokens_per_second": med(re_, "tokens_per_second"),
        "torch_tokens_per_second": med(rt, "tokens_per_second"),
        "edgeft_first_token_s": med(re_, "first_token_seconds"),
        "torch_first_token_s": med(rt, "first_token_seconds"),
        "edgeft_decode_ms_per_token": 1e3 * med(re_, "decode_seconds_per_token"),
        "torch_decode_ms_per_token": 1e3 * med(rt, "decode_seconds_per_token"),
        # Greedy on the same weights and prompt: the sequences should agree (fp32 noise aside).
        "same_tokens": sum(a == b for a, b in zip(re_[-1]["tokens"], rt[-1]["tokens"])) / n,
    }
    row["tokens_per_second_ratio"] = row["edgeft_tokens_per_second"] / row["torch_tokens_per_second"]
    row["decode_step_ratio"] = row["torch_decode_ms_per_token"] / row["edgeft_decode_ms_per_token"]
    return row


def bench_switch(spec: dict, plan: dict) -> dict:
    """Adapter switch cost on one decoder, and the ORT / torch matmul peaks for context."""
    targets = spec["grid"]["targets"][0]
    p = common.paths(spec, targets)
    args = ["--bundle", str(p["bundle"]), "--adapter", str(p["adapter_a"]), "--adapter-b", str(p["adapter_b"])]
    e = Worker("decode-edgeft", p["logs"], *args, tag="-switch")
    e.call("first_step", adapter="a", prompt_len=plan["switch_prompt"])  # warm-up
    probe = e.call("switch_probe", prompt_len=plan["switch_prompt"], repeats=plan["switch_repeats"])
    session = e.call("new_session", repeats=plan["session_repeats"])
    from worker import matmul_model

    ort_sgemm = e.call("sgemm", model=str(matmul_model(p["logs"] / "matmul-3072.onnx")))
    e.close()
    t = Worker("decode-torch", p["logs"], *worker_args("torch", spec, targets), tag="-sgemm")
    torch_sgemm = t.call("sgemm")
    t.close()
    out = {
        "model": spec["name"],
        "targets": targets,
        "prompt_len": plan["switch_prompt"],
        "switched_s": probe["switched"],
        "same_s": probe["same"],
        "switched_median_s": common.median(probe["switched"]),
        "same_median_s": common.median(probe["same"]),
        "added_ms": 1e3 * common.median([a - b for a, b in zip(probe["switched"], probe["same"])]),
        "new_session_median_s": common.median(session["seconds"]),
        "ort_sgemm_gflops": ort_sgemm["gflops"],
        "torch_sgemm_gflops": torch_sgemm["gflops"],
    }
    log(f"adapter switch adds {out['added_ms']:+.2f} ms; a new session takes {out['new_session_median_s']:.2f}s")
    return out


# ---------------------------------------------------------------------------------------------
# Through the CLI: edgeft train per base precision vs the torch script, eval loss after N steps


def bench_cli(specs: list[dict], plan: dict) -> dict:
    c = plan["eval_check"]
    spec, targets = specs[c["model"]], c["targets"]
    data, evals = common.ROOT / "examples/data/train.jsonl", common.ROOT / "examples/data/eval.jsonl"
    runs = []
    work = common.paths(spec, targets)["root"] / "cli-runs"
    for precision in plan["precisions"]:
        p = common.paths(spec, targets, precision)
        out = work / precision
        cmd = [str(common.device_python().parent / "edgeft"), "train", str(p["bundle"]), "--data", str(data)]
        cmd += ["--eval-data", str(evals), "--max-steps", str(c["steps"]), "--out", str(out)]
        cmd += ["--threads", str(common.THREADS), "--no-progress"]
        runs.append(timed_run(f"edgeft train ({precision} base)", cmd, out, out / "summary.json", precision))
    p = common.paths(spec, targets)
    out = work / "torch"
    cmd = [str(common.host_python()), str(common.BENCH / "torch_train.py"), "--model", str(p["model"])]
    cmd += ["--adapter", str(p["adapter_a"]), "--data", str(data), "--eval-data", str(evals)]
    cmd += ["--max-steps", str(c["steps"]), "--out", str(out / "summary.json")]
    runs.append(timed_run("torch + PEFT script (fp32)", cmd, out, out / "summary.json", "fp32"))
    fp32 = runs[0]["eval_loss"]
    for r in runs:
        r["eval_loss_gap"] = abs(r["eval_loss"] - fp32) / fp32
    return {
        "model": spec["name"],
        "targets": targets,
        "steps": c["steps"],
        "data": "examples/data/train.jsonl",
        "runs": runs,
    }


def timed_run(name: str, cmd: list[str], out: Path, summary: Path, precision: str) -> dict:
    """Wall time and peak RSS of a whole command (GNU time's %M: the child's max RSS)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if name.startswith("edgeft"):
        out.rmdir()  # edgeft train wants to create (or resume) its run directory itself
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    row = {
        "name": name,
        "precision": precision,
        "wall_seconds": wall,
        "peak_rss_mb": int(proc.stderr.split()[-1]) / 1024,
    }
    row.update(train_seconds=s["seconds"], eval_loss_before=s["eval_loss_before"], eval_loss=s["eval_loss"])
    log(
        f"{name}: {wall:.1f}s wall, peak RSS {row['peak_rss_mb']:.0f} MB, eval loss {s['eval_loss_before']:.4f} -> {s['eval_loss']:.4f}"
    )
    return row


# ---------------------------------------------------------------------------------------------


def probes(tag: str) -> dict:
    log(f"roofline probes ({tag}): numpy sgemm peak, memory read bandwidth")
    return {"sgemm": common.sgemm_peak(), "bandwidth": common.read_bandwidth(), "at": time.strftime("%H:%M:%S")}


def device_versions() -> dict:
    code = "import json, sys; sys.path.insert(0, 'benchmarks'); import common; print(json.dumps(common.library_versions()))"
    out = subprocess.run([str(common.device_python()), "-c", code], cwd=common.ROOT, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-500:]}


def check_pythons() -> None:
    for name, py, make in (("device", common.device_python(), "device-venv"), ("host", common.host_python(), "venv")):
        if not py.is_file():
            sys.exit(f"bench: the {name} venv's python ({py}) is missing; run `make {make}` (or `make bench`)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid, under ~10 minutes (= --plan quick)")
    parser.add_argument("--plan", choices=sorted(PLANS), default="full")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached models, bundles and artifacts")
    parser.add_argument("--only-build", action="store_true", help="build the cache and stop")
    parser.add_argument("--repeats", type=int, help="override the number of timed repeats")
    parser.add_argument("--torch-attn", default="sdpa", help="transformers attention for the reference (sdpa|eager)")
    parser.add_argument("--out", type=Path, default=common.BENCH)
    args = parser.parse_args()
    check_pythons()
    plan = dict(PLANS["quick" if args.quick else args.plan], torch_attn=args.torch_attn)
    if args.repeats:
        plan.update(train_repeats=args.repeats, decode_repeats=args.repeats)
    started, cpu_start = time.time(), common.cpu_snapshot()
    machine = common.machine_info()
    log(f"edgeft benchmarks ({plan['mode']}) on {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB")
    recompute_available = "recompute" in common.export_options()
    specs = model_specs(plan)
    t0 = time.perf_counter()
    built = build(specs, plan, recompute_available, args.rebuild)
    build_seconds = time.perf_counter() - t0
    if args.only_build:
        return
    results = {"mode": plan["mode"], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "plan": plan}
    results.update(recompute_available=recompute_available, build_seconds=build_seconds, built=built)
    results["models"] = {
        s["name"]: {**s, "facts": {t: common.model_facts(s, t) for t in s["grid"]["targets"]}} for s in specs
    }
    before = probes("before")
    results["train"] = []
    t0 = time.perf_counter()
    for cell in cells(specs, plan, recompute_available):
        results["train"].append(bench_cell(cell, plan, results["train"]))
    results["train_seconds"] = time.perf_counter() - t0
    results["decode"] = bench_decode(specs, plan)
    results["switch"] = bench_switch(specs[0], plan)
    results["cli"] = bench_cli(specs, plan)
    after = probes("after")
    results["probes"] = {"before": before, "after": after}
    results["probes"]["sgemm_gflops"] = max(x["sgemm"]["gflops"] for x in (before, after))
    results["probes"]["bandwidth_gbps"] = max(x["bandwidth"]["gbps"] for x in (before, after))
    results["machine"] = {**machine, "load_average_at_end": list(os.getloadavg())}
    results["machine"]["background_cores"] = common.background_cores(cpu_start, common.cpu_snapshot())
    results["versions"] = {"host": common.library_versions(), "device": device_versions()}
    results["threads"] = common.THREADS
    results["wall_seconds"] = time.time() - started
    report.derive(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, args.out)
    log(f"done in {results['wall_seconds']:.0f}s: {args.out / 'RESULTS.md'}")
    print(report.summary_table(results))


if __name__ == "__main__":
    main()
