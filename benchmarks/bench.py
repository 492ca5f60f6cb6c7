"""edgeft vs PyTorch + PEFT and Hugging Face generate, side by side on one machine.

    python benchmarks/bench.py [--quick] [--rebuild] [--repeats N]

Writes benchmarks/results.json and benchmarks/RESULTS.md (and benchmarks/scaling.png for the
full run). Every comparison runs both contenders in this one invocation, each in its own worker
process (its own threads and peak RSS), alternating one repeat of edgeft with one of the
reference (and which one goes first) after warm-up; medians are reported as edgeft / reference.
The rooflines (numpy sgemm peak, memory read bandwidth) are measured in the same run, before,
between and after the comparisons; the best of the three is used.
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

FULL = {
    "mode": "full",
    "train_seqs": [128, 256, 512],
    "train_scaling_seqs": [768, 1024],
    "train_warmup": 1,
    "train_repeats": 5,
    "scaling_repeats": 3,
    # Up to this length both training workers stay alive and alternate; longer (scaling points)
    # they run one after the other, since two peaks of 10+ GB do not fit next to each other.
    "side_by_side_max_seq": 512,
    "decode_prompts": [128, 512],
    "decode_new_tokens": 128,
    "decode_warmup": 1,
    "decode_repeats": 5,
    "decode_scaling_contexts": [128, 256, 512, 1024, 2048],
    "decode_scaling_new_tokens": 32,
    "switch_prompt": 8,
    "switch_repeats": 60,
    "session_repeats": 3,
}
QUICK = {
    **FULL,
    "mode": "quick",
    "train_seqs": [128],
    "train_scaling_seqs": [],
    "train_repeats": 3,
    "decode_prompts": [128],
    "decode_new_tokens": 32,
    "decode_scaling_contexts": [],
    "switch_repeats": 30,
    "session_repeats": 2,
}


class Worker:
    """A worker.py process: one JSON command per line in, one JSON answer per line out."""

    def __init__(self, kind: str, log_dir: Path, *args: str, env: dict | None = None, tag: str = ""):
        self.kind = kind
        self.log = log_dir / f"{kind}{'-'.join(['', *args[1::2]])}{tag}.log"
        self.proc = subprocess.Popen(
            [sys.executable, str(common.BENCH / "worker.py"), kind, *args],
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
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        """Final memory figures (VmHWM = peak RSS over the worker's whole life)."""
        final = self.call("quit")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return final


def alternate(a: Worker, b: Worker, op: str, kw: dict, warmup: int, repeats: int) -> tuple[list, list]:
    """Warm both up, then repeats of (a, b) / (b, a) alternately: drift and background load fall
    on both contenders alike."""
    for w in (a, b):
        for _ in range(warmup):
            w.call(op, **kw)
    ra, rb = [], []
    for i in range(repeats):
        for w in (a, b) if i % 2 == 0 else (b, a):
            (ra if w is a else rb).append(w.call(op, **kw))
    return ra, rb


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def _memory_needed(rows: list[dict], seq: int) -> float:
    """Peak RSS to expect at ``seq``: the largest measured peak scaled by the sequence ratio, +20 %."""
    if not rows:
        return 0.0
    last = max(rows, key=lambda x: x["seq"])
    peak = max(last["edgeft_peak_rss_mb"], last["torch_peak_rss_mb"])
    return 1.2 * peak * seq / last["seq"]


def _steps(w: Worker, warmup: int, repeats: int) -> list[dict]:
    for _ in range(warmup):
        w.call("step")
    return [w.call("step") for _ in range(repeats)]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def med(results: list[dict], key: str) -> float:
    return common.median([r[key] for r in results])


# ---------------------------------------------------------------------------------------------


def bench_train(
    plan: dict, facts: dict, logs: Path, seqs: list[int], repeats: int, known: list[dict] = ()
) -> list[dict]:
    rows = []
    for seq in seqs:
        log(f"train step, batch 4, seq {seq}: loading edgeft and torch+PEFT workers")
        load = os.getloadavg()[0]
        cpu0 = common.cpu_snapshot()
        torch_args = ("--seq", str(seq), "--attn", plan["torch_attn"])
        if seq <= plan["side_by_side_max_seq"]:
            e = Worker("train-edgeft", logs, "--seq", str(seq))
            t = Worker("train-torch", logs, *torch_args)
            re_, rt = alternate(e, t, "step", {}, plan["train_warmup"], repeats)
            me, mt = e.close(), t.close()
        else:  # both alive at once would need more memory than the box has: one after the other
            need = _memory_needed([*known, *rows], seq)
            if need > _mem_available_mb():
                log(f"  seq {seq}: skipped, ~{need:.0f} MB needed and {_mem_available_mb():.0f} MB available")
                continue
            e = Worker("train-edgeft", logs, "--seq", str(seq))
            re_ = _steps(e, plan["train_warmup"], repeats)
            me = e.close()
            t = Worker("train-torch", logs, *torch_args)
            rt = _steps(t, plan["train_warmup"], repeats)
            mt = t.close()
        background = common.background_cores(cpu0, common.cpu_snapshot())
        tokens = 4 * seq
        flops = 4 * (facts["params_matmul"] + facts["params_lora"]) * tokens
        row = {
            "seq": seq,
            "batch": 4,
            "tokens": tokens,
            "flops_per_step": flops,
            "edgeft_seconds": [r["seconds"] for r in re_],
            "edgeft_forward_backward_seconds": [r["forward_backward_seconds"] for r in re_],
            "torch_seconds": [r["seconds"] for r in rt],
            "edgeft_median_s": med(re_, "seconds"),
            "edgeft_forward_backward_median_s": med(re_, "forward_backward_seconds"),
            "torch_median_s": med(rt, "seconds"),
            "edgeft_loss": re_[-1]["loss"],
            "torch_loss": rt[-1]["loss"],
            "edgeft_peak_rss_mb": me["vm_hwm_mb"],
            "torch_peak_rss_mb": mt["vm_hwm_mb"],
            "edgeft_load": e.ready,
            "torch_load": t.ready,
            "load_average_1m": [load, os.getloadavg()[0]],
            "background_cores": background,
        }
        row["time_ratio"] = row["edgeft_median_s"] / row["torch_median_s"]
        row["rss_ratio"] = row["edgeft_peak_rss_mb"] / row["torch_peak_rss_mb"]
        rows.append(row)
        log(
            f"  seq {seq}: edgeft {row['edgeft_median_s']:.2f}s, torch {row['torch_median_s']:.2f}s "
            f"(x{row['time_ratio']:.2f}); peak RSS {row['edgeft_peak_rss_mb']:.0f} vs {row['torch_peak_rss_mb']:.0f} MB; "
            f"other processes used {background:.2f} cores"
        )
    return rows


def bench_decode(plan: dict, logs: Path) -> dict:
    log("decode: loading edgeft (TextGenerator) and transformers generate workers")
    cpu0 = common.cpu_snapshot()
    e = Worker("decode-edgeft", logs)
    t = Worker("decode-torch", logs, "--attn", plan["torch_attn"])
    out = {"edgeft_load": e.ready, "torch_load": t.ready, "runs": [], "scaling": []}
    log("kernel peaks (ONNX Runtime MatMul, torch matmul), before and after the decode comparisons")
    sgemm_start = e.call("sgemm"), t.call("sgemm")
    n = plan["decode_new_tokens"]
    for prompt in plan["decode_prompts"]:
        load = os.getloadavg()[0]
        re_, rt = alternate(
            e, t, "generate", {"prompt_len": prompt, "new_tokens": n}, plan["decode_warmup"], plan["decode_repeats"]
        )
        row = _decode_row(prompt, n, re_, rt)
        row["load_average_1m"] = [load, os.getloadavg()[0]]
        out["runs"].append(row)
        log(
            f"  prompt {prompt} + {n} new: edgeft {row['edgeft_tokens_per_second']:.2f} tok/s, "
            f"transformers {row['torch_tokens_per_second']:.2f} tok/s (x{row['tokens_per_second_ratio']:.2f})"
        )
    for ctx in plan["decode_scaling_contexts"]:
        m = plan["decode_scaling_new_tokens"]
        re_, rt = alternate(e, t, "generate", {"prompt_len": ctx, "new_tokens": m}, 0, plan["scaling_repeats"])
        out["scaling"].append(_decode_row(ctx, m, re_, rt))
        log(f"  scaling, context {ctx}: edgeft {out['scaling'][-1]['edgeft_decode_ms_per_token']:.1f} ms/token")
    log("adapter switch vs new session (edgeft)")
    e.call("first_step", adapter="a", prompt_len=plan["switch_prompt"])  # warm-up
    probe = e.call("switch_probe", prompt_len=plan["switch_prompt"], repeats=plan["switch_repeats"])
    bind = e.call("bind_probe")
    session = e.call("new_session", repeats=plan["session_repeats"])
    out["switch"] = {
        "prompt_len": plan["switch_prompt"],
        "switched_s": probe["switched"],
        "same_s": probe["same"],
        "switched_median_s": common.median(probe["switched"]),
        "same_median_s": common.median(probe["same"]),
        # Each switched request against the same-adapter request right after it: robust to drift.
        "paired_added_ms": 1e3 * common.median([a - b for a, b in zip(probe["switched"], probe["same"])]),
        "rebind_us": bind["switch_us"],
        "bound_check_us": bind["same_us"],
        "new_session_s": session["seconds"],
        "new_session_median_s": common.median(session["seconds"]),
    }
    out["switch"]["median_gap_ms"] = 1e3 * (out["switch"]["switched_median_s"] - out["switch"]["same_median_s"])
    out["switch"]["added_ms"] = out["switch"]["paired_added_ms"]
    log(
        f"  switch adds {out['switch']['added_ms']:+.2f} ms; a new session takes {out['switch']['new_session_median_s']:.2f}s"
    )
    sgemm_end = e.call("sgemm"), t.call("sgemm")
    out["ort_sgemm"] = max(sgemm_start[0], sgemm_end[0], key=lambda x: x["gflops"])
    out["torch_sgemm"] = max(sgemm_start[1], sgemm_end[1], key=lambda x: x["gflops"])
    out["edgeft_final"], out["torch_final"] = e.close(), t.close()
    out["background_cores"] = common.background_cores(cpu0, common.cpu_snapshot())
    log(f"  other processes used {out['background_cores']:.2f} cores during the decode comparisons")
    return out


def _decode_row(prompt: int, n: int, re_: list[dict], rt: list[dict]) -> dict:
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


def probes(tag: str) -> dict:
    log(f"roofline probes ({tag}): numpy sgemm peak, memory read bandwidth")
    return {"sgemm": common.sgemm_peak(), "bandwidth": common.read_bandwidth(), "at": time.strftime("%H:%M:%S")}


def bundle_size(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced set, under 5 minutes")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached model and bundle")
    parser.add_argument("--repeats", type=int, help="override the number of timed repeats")
    parser.add_argument("--torch-attn", default="sdpa", help="transformers attention for the reference (sdpa|eager)")
    parser.add_argument("--out", type=Path, default=common.BENCH)
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL, torch_attn=args.torch_attn)
    if args.repeats:
        plan.update(train_repeats=args.repeats, decode_repeats=args.repeats)
    started = time.time()
    cpu_start = common.cpu_snapshot()
    machine = common.machine_info()
    log(f"edgeft benchmarks ({plan['mode']}) on {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB")
    meta = common.ensure_cache(log, rebuild=args.rebuild)
    paths = common.paths()
    facts = common.model_facts(paths["model"])
    logs = paths["root"] / "logs"
    logs.mkdir(exist_ok=True)

    before = probes("before")
    train = bench_train(plan, facts, logs, plan["train_seqs"], plan["train_repeats"])
    scaling_train = bench_train(plan, facts, logs, plan["train_scaling_seqs"], plan["scaling_repeats"], known=train)
    middle = probes("between")
    decode = bench_decode(plan, logs)
    after = probes("after")

    results = {
        "mode": plan["mode"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_seconds": None,
        "plan": plan,
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "versions": common.library_versions(),
        "threads": common.THREADS,
        "model": {
            **facts,
            "config": common.MODEL,
            "lora": {"r": common.LORA_R, "alpha": common.LORA_ALPHA, "targets": common.LORA_TARGETS},
        },
        "probes": {
            "before": before,
            "between": middle,
            "after": after,
            "sgemm_gflops": max(x["sgemm"]["gflops"] for x in (before, middle, after)),
            "bandwidth_gbps": max(x["bandwidth"]["gbps"] for x in (before, middle, after)),
            "ort_sgemm_gflops": decode["ort_sgemm"]["gflops"],
            "torch_sgemm_gflops": decode["torch_sgemm"]["gflops"],
        },
        "train": train,
        "train_scaling": scaling_train,
        "decode": decode,
        "bundle": {
            "bytes": bundle_size(paths["bundle"]),
            "fp32_weight_bytes": facts["fp32_weight_bytes"],
            "export_seconds": meta["export_seconds"],
            "export_peak_rss_mb": meta.get("export_peak_rss_mb"),
            "built": meta["built"],
        },
    }
    results["bundle"]["ratio"] = results["bundle"]["bytes"] / results["bundle"]["fp32_weight_bytes"]
    report.derive(results)
    results["wall_seconds"] = time.time() - started
    results["machine"]["background_cores"] = common.background_cores(cpu_start, common.cpu_snapshot())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if plan["mode"] == "full":
        report.plot(results, args.out / "scaling.png")
    (args.out / "RESULTS.md").write_text(report.markdown(results) + "\n" + report.other_sections())
    log(f"done in {results['wall_seconds']:.0f}s: {args.out / 'RESULTS.md'}")
    print(report.summary_table(results))


if __name__ == "__main__":
    main()
