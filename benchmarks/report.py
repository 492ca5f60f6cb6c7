"""results.json -> the worst case per metric against its target, RESULTS.md and scaling.png.

``python benchmarks/report.py`` re-renders RESULTS.md and the plot from the last results.json
(and ab_results.json) without measuring anything.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPTIMISATIONS = HERE / "optimisations.json"
AB = HERE / "ab_results.json"
COMMANDS = {"quick": "make bench-quick", "fp32": "bench.py --plan fp32 --out benchmarks/fp32-grid"}

# Issue #13's targets, as data: which grid rows a target covers (engine edgeft unless said), the
# metric (a ratio edgeft / torch+PEFT fp32 of the same cell, measured side by side), the bound.
TARGETS = [
    {"key": "fp32_rss", "precision": "fp32", "recompute": "none", "metric": "rss_ratio", "max": 1.0, "seqs": None},
    {
        "key": "fp32_rss_rc",
        "precision": "fp32",
        "recompute": "layers",
        "metric": "rss_ratio",
        "max": 0.6,
        "seqs": [1024],
    },
    {"key": "fp32_step", "precision": "fp32", "recompute": "none", "metric": "time_ratio", "max": 0.9, "seqs": None},
    {
        "key": "fp32_step_rc",
        "precision": "fp32",
        "recompute": "layers",
        "metric": "time_ratio",
        "max": 1.15,
        "seqs": None,
    },
    {"key": "int8_rss", "precision": "int8", "recompute": "none", "metric": "rss_ratio", "max": 0.45, "seqs": None},
    {
        "key": "int8_rss_rc",
        "precision": "int8",
        "recompute": "layers",
        "metric": "rss_ratio",
        "max": 0.45,
        "seqs": None,
    },
    {"key": "int8_step", "precision": "int8", "recompute": "none", "metric": "time_ratio", "max": 0.7, "seqs": None},
    {
        "key": "int8_step_rc",
        "precision": "int8",
        "recompute": "layers",
        "metric": "time_ratio",
        "max": 0.7,
        "seqs": None,
    },
    {"key": "int4_rss", "precision": "int4", "recompute": "none", "metric": "rss_ratio", "max": 0.35, "seqs": None},
    {
        "key": "int4_rss_rc",
        "precision": "int4",
        "recompute": "layers",
        "metric": "rss_ratio",
        "max": 0.35,
        "seqs": None,
    },
    {"key": "int4_step", "precision": "int4", "recompute": "none", "metric": "time_ratio", "max": 0.6, "seqs": None},
    {
        "key": "int4_step_rc",
        "precision": "int4",
        "recompute": "layers",
        "metric": "time_ratio",
        "max": 0.6,
        "seqs": None,
    },
]
METRIC_LABEL = {"rss_ratio": "Peak training RSS", "time_ratio": "Train step time"}

# What limits a metric that misses its target: the measurements behind it (ab.py's op profile and
# memory trace, the A/B rows) are in RESULTS.md's last sections; update with each full run.
LIMITS = {
    "rss": (
        "Above RSS-after-load, the peak is the activations the forward keeps for the backward (the MLP "
        "intermediates; attention probabilities are recomputed one layer at a time) and the loss head's "
        "batch × seq × vocabulary logits and their gradient, plus ONNX Runtime's arena; the frozen weights are "
        "a small part at these sizes, so quantizing them moves the ratio little. An int8 base is dequantized "
        "to float32 per layer; an int4 base holds either the float32 temporary of an unpacked MatMulNBits call "
        "(the largest weight, the head) or MLAS's packed layouts (findings below)."
    ),
    "time": (
        "The matmuls dominate the step and MLAS runs them at about torch's (MKL) speed on this CPU; MLAS's "
        "int4 kernel with float32 compute dequantizes tiles of the weight and is no faster than its sgemm, and "
        "int8 compute (accuracy_level 4) moves the loss."
    ),
    "decode": (
        "Both decoders read every fp32 weight once per token; the gap is transformers' per-token Python and "
        "PEFT-layer overhead, which shrinks as the model (and each weight read) grows; LoRA on every linear "
        "layer adds one small GEMV pair per layer to both sides."
    ),
    "eval_gap": "Quantization error of the frozen base (int4: 4-bit blocks of 32, one scale each).",
}


def _measured(r: dict):
    """(cell row, variant) for every measured variant."""
    for row in r["train"]:
        for v in row["variants"]:
            if v.get("status") == "measured":
                yield row, v


def derive(r: dict) -> None:
    """Worst case (largest ratio) per target over the grid, and the comparisons beside them."""
    head = {}
    for t in TARGETS:
        hits = [
            (v[t["metric"]], row)
            for row, v in _measured(r)
            if v["engine"] == "edgeft"
            and v["precision"] == t["precision"]
            and v["recompute"] == t["recompute"]
            and (t["seqs"] is None or row["seq"] in t["seqs"])
        ]
        entry = {"target": t["max"], "metric": t["metric"]}
        if hits:
            value, row = max(hits, key=lambda h: h[0])
            entry.update(value=value, met=value <= t["max"], at=_cell_name(row), cells=len(hits))
        else:
            entry.update(value=None, met=None, why=_why_missing(r, t))
        head[t["key"]] = entry
    head.update(_decode_heads(r))
    head.update(_eval_heads(r))
    r["headline"] = head


def _why_missing(r: dict, t: dict) -> str:
    if t["recompute"] != "none" and not r.get("recompute_available"):
        return "not available yet: ExportConfig has no `recompute` field in this checkout"
    if t["seqs"]:
        return f"not measured in this run (needs seq {', '.join(map(str, t['seqs']))}: `make bench`)"
    return "not measured in this run"


def _decode_heads(r: dict) -> dict:
    out = {}
    for targets in ("attn", "all"):
        rows = [x for x in r["decode"] if x["targets"] == targets and x["precision"] == "fp32"]
        entry = {"target": 2.0, "metric": "tokens_per_second_ratio", "min": True}
        if rows:
            worst = min(rows, key=lambda x: x["tokens_per_second_ratio"])
            entry.update(value=worst["tokens_per_second_ratio"], at=f"{worst['model']}, prompt {worst['prompt_len']}")
            entry["met"], entry["cells"] = entry["value"] >= 2.0, len(rows)
        else:
            entry.update(value=None, met=None, why="not measured in this run")
        out[f"decode_{targets}"] = entry
    return out


def _eval_heads(r: dict) -> dict:
    out = {}
    for run in r["cli"]["runs"]:
        if run["name"].startswith("edgeft") and run["precision"] != "fp32":
            out[f"eval_gap_{run['precision']}"] = {
                "target": 0.01,
                "metric": "eval_loss_gap",
                "value": run["eval_loss_gap"],
                "met": run["eval_loss_gap"] <= 0.01,
                "at": f"{r['cli']['model']}, LoRA {r['cli']['targets']}, {r['cli']['steps']} steps",
                "cells": 1,
            }
    return out


def _cell_name(row: dict) -> str:
    return f"{row['model']}, LoRA {row['targets']}, seq {row['seq']}"


def _label(key: str) -> str:
    if key.startswith("decode_"):
        which = "attention only" if key.endswith("attn") else "all linear layers"
        return f"Decode tokens/s, edgeft / transformers generate (fp32, LoRA on {which})"
    if key.startswith("eval_gap_"):
        return f"Eval loss after the CLI run, {key.removeprefix('eval_gap_')} base vs fp32 base (relative gap)"
    t = next(t for t in TARGETS if t["key"] == key)
    seqs = f", seq {', '.join(map(str, t['seqs']))}" if t["seqs"] else ""
    rc = "no recompute" if t["recompute"] == "none" else f"recompute {t['recompute']}"
    return f"{METRIC_LABEL[t['metric']]}, {t['precision']} base, {rc}{seqs} / torch+PEFT fp32"


def _fmt_target(key: str, e: dict) -> str:
    if key.startswith("eval_gap_"):
        return f"≤ {100 * e['target']:.0f} %"
    return f"{'≥' if e.get('min') else '≤'} {e['target']:.2f}×"


def _fmt_value(key: str, v) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.2f} %" if key.startswith("eval_gap_") else f"{v:.2f}×"


def _limit(key: str, e: dict) -> str:
    if e["met"] is None:
        return e.get("why", "")
    if e["met"]:
        return "—"
    if key.startswith("decode"):
        return LIMITS["decode"]
    if key.startswith("eval_gap"):
        return LIMITS["eval_gap"]
    ab = json.loads(AB.read_text()) if AB.is_file() else {}
    measured = _trace_text(ab) if "rss" in key else _profile_text(ab)
    return " ".join(x for x in (LIMITS["rss" if "rss" in key else "time"], measured, _tried_text(ab, key)) if x)


def _trace_text(ab: dict) -> str:
    """The memory trace behind an RSS limit, in one sentence."""
    traces = ab.get("memory_trace")
    if not traces:
        return ""
    parts = [
        f"{name} {m['after_load_mb']:.0f} MB after load → {m['peak_mb']:.0f} MB peak at {m['peak_at']:.2f} of the first step"
        for name, m in traces.items()
    ]
    return f"Measured ({next(iter(traces.values()))['cell']}): " + "; ".join(parts) + "."


def _profile_text(ab: dict) -> str:
    t = ab.get("profile_train")
    if not t:
        return ""
    ops = ", ".join(f"{o['op']} {100 * o['share']:.0f} %" for o in t["ops"][:5])
    return f"Op profile ({t['cell']}): {ops} of {t['kernel_ms_per_run']:.0f} ms kernel time."


def _tried_text(ab: dict, key: str) -> str:
    """What turning each disabled session option back on did at the A/B point, for this base."""
    precision = "int4" if key.startswith("int4") else "fp32"
    x = ab.get(f"train_options_{precision}")
    if not x:
        return ""
    variants = list(x["variants"].items())
    (_, base), rest = variants[0], variants[1:]
    tried = ", ".join(
        f"{name.split(' (')[0]}: step ×{v['median_s'] / base['median_s']:.2f}, peak RSS ×{v['peak_rss_mb'] / base['peak_rss_mb']:.2f}"
        for name, v in rest
    )
    return f"Tried ({precision} base, A/B rows): {tried}."


def summary_table(r: dict) -> str:
    lines = [
        "| Metric | Worst case | Where | Target | Met | What limits it |",
        "|---|---|---|---|---|---|",
    ]
    for key, e in r["headline"].items():
        met = {True: "met", False: "**not met**", None: "not measured"}[e["met"]]
        where = f"{e['at']} (worst of {e['cells']})" if e.get("at") else "—"
        lines.append(
            f"| {_label(key)} | {_fmt_value(key, e['value'])} | {where} | {_fmt_target(key, e)} | {met} | {_limit(key, e)} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def markdown(r: dict) -> str:
    out = _header(r) + _machine(r) + _models(r)
    out += ["## Results against the targets", ""]
    out += [
        "Worst case over the grid per metric (largest ratio; smallest for decode), each ratio measured side by "
        "side in one run against torch + PEFT eager fp32 (transformers' "
        f"`{r['plan']['torch_attn']}` attention) on the same model, LoRA targets and batch. The table behind each "
        "row follows.",
        "",
        summary_table(r),
        "",
    ]
    out += _train_table(r) + _ort119_table(r) + _decode_table(r) + _switch(r) + _cli_table(r) + _bundles(r)
    out += ["## Scaling", "", "![scaling](scaling.png)", ""]
    out += _optimisations() + _notes(r)
    return "\n".join(out) + "\n"


def _header(r: dict) -> list[str]:
    out = [
        "# edgeft benchmarks: the grid, side by side with torch + PEFT and transformers generate",
        "",
        f"Run: **{r['mode']}** (`{COMMANDS.get(r['mode'], 'make bench')}`), {r['date']}, "
        f"{r['wall_seconds']:.0f} s wall ({r['build_seconds']:.0f} s of it building the cache, "
        f"{r['train_seconds']:.0f} s the training grid). Generated by `benchmarks/bench.py` from `results.json`; "
        "do not edit by hand.",
        "",
    ]
    if r["mode"] != "full":
        out += [
            f"> **{r['mode'].capitalize()} run:** a reduced grid ("
            f"{'/'.join(sorted({str(s['config']['num_hidden_layers']) for s in r['models'].values()}))}-layer models, seq "
            f"{', '.join(str(s) for s in r['plan']['seqs'])}, {'/'.join(r['plan']['precisions'])} bases, "
            f"{r['plan']['train_repeats']} repeats; the machine's load "
            "is in the table below). Its figures show the harness works and the direction of each ratio; the "
            "targets are judged on `make bench` (the full grid: 8-layer models, seq up to 1024).",
            "",
        ]
    bg = r["machine"].get("background_cores")
    if bg is not None and bg >= 0.25:
        out += [
            f"> **Busy machine:** other processes kept {bg:.2f} of {r['machine']['cores']} cores busy on average. "
            "Absolute times are pessimistic; torch (many short OpenMP regions) tends to lose more to contention "
            "than ONNX Runtime, so time ratios lean in edgeft's favour. Peak RSS is not timing-sensitive.",
            "",
        ]
    return out


def _machine(r: dict) -> list[str]:
    m, p = r["machine"], r["probes"]
    host, dev = r["versions"]["host"], r["versions"]["device"]
    return [
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} ({m['cpu_flags']}) |",
        f"| Cores | {m['cores']} (every contender uses {r['threads']} threads: `torch.set_num_threads`, ORT `intra_op_num_threads`) |",
        f"| RAM | {m['ram_gb']} GB |",
        f"| Load average (1 / 5 / 15 min) at start | {' / '.join(f'{x:.2f}' for x in m['load_average_at_start'])} |",
        f"| Load average (1 / 5 / 15 min) at end | {' / '.join(f'{x:.2f}' for x in m['load_average_at_end'])} |",
        f"| Other processes' CPU use during the run (/proc/stat minus the benchmark's own) | {_bg(m.get('background_cores'))} of {m['cores']} cores on average |",
        f"| numpy sgemm peak (float32 3072², best of 5) | {p['sgemm_gflops']:.1f} GFLOP/s |",
        f"| ONNX Runtime MatMul peak (MLAS) / torch matmul peak | {r['switch']['ort_sgemm_gflops']:.1f} / {r['switch']['torch_sgemm_gflops']:.1f} GFLOP/s |",
        f"| Memory read bandwidth (numpy sum over 1 GB) | {p['bandwidth_gbps']:.1f} GB/s |",
        f"| Python / kernel | {m['python']} / {m['kernel']} |",
        "| Host venv (torch, 1.19 engine, build) | " + _versions(host) + " |",
        "| Device venv (edgeft workers, no torch) | " + _versions(dev) + " |",
        "",
    ]


def _versions(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items() if val) if "error" not in v else f"unknown ({v['error']})"


def _models(r: dict) -> list[str]:
    out = [
        "## Models",
        "",
        "Random weights, untied lm_head, vocabulary 32000 (batches are random ids over all of it), batch "
        f"{r['train'][0]['batch'] if r['train'] else 4}. LoRA r=8, alpha=16; `attn` = on the attention projections, "
        "`all` = on every linear layer of the blocks. One build per model into `benchmarks/.cache/`.",
        "",
        "| model | layout | hidden | layers | intermediate | parameters (M) | LoRA `attn` / `all` (k) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["models"].items():
        c, f = s["config"], s["facts"]
        lora = " / ".join(f"{f[t]['params_lora'] / 1e3:.0f}" if t in f else "—" for t in ("attn", "all"))
        out.append(
            f"| {name} | {s['layout']} | {c['hidden_size']} | {c['num_hidden_layers']} | {c['intermediate_size']} "
            f"({s['mlp_ratio']}×) | {next(iter(f.values()))['params_total'] / 1e6:.1f} | {lora} |"
        )
    return out + [""]


def _train_table(r: dict) -> list[str]:
    p = r["plan"]
    out = [
        "## 1. LoRA train step, the grid",
        "",
        "Per cell one torch + PEFT worker (eager fp32: `loss.backward()`, `clip_grad_norm_(1.0)`, `torch.optim.AdamW`) "
        "stays alive; each variant's worker in turn (edgeft in the device venv: `LoraGraphs.loss_and_grads` + numpy "
        "AdamW through `train._Run._optimizer_step`; the 1.19 engine in the host venv) takes "
        f"{p['train_warmup']} warm-up step, then {p['train_repeats']} steps alternating with torch (which goes first "
        "alternates). Medians; the torch column is the median of the torch steps interleaved with that variant. "
        "Peak RSS = VmHWM of each worker (load + all steps), torch's over the whole cell. At most two training "
        "workers are alive at once; a cell marked 'seq.' ran one after the other because both peaks would not "
        "have fit in the memory available.",
        "",
        "| model | LoRA | seq | engine | base | recompute | s/step | torch s/step | time ratio | peak RSS MB | torch peak RSS MB | RSS ratio | same loss | mode | others' cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["train"]:
        for v in row["variants"]:
            head = f"| {row['model']} | {row['targets']} | {row['seq']} | {v['engine']} | {v['precision']} | {v['recompute']} |"
            if v.get("status") != "measured":
                out.append(f"{head} {v.get('status')} | | | | | | | | |")
                continue
            same = "yes" if abs(v["loss"] - v["torch_loss"]) < 2e-2 * abs(v["torch_loss"]) else "no"
            out.append(
                f"{head} {v['median_s']:.3f} | {v['torch_median_s']:.3f} | {v['time_ratio']:.2f}× | "
                f"{v['peak_rss_mb']:.0f} | {row['torch_peak_rss_mb']:.0f} | {v['rss_ratio']:.2f}× | {same} | "
                f"{'side by side' if row['side_by_side'] else 'seq.'} | {_bg(row.get('background_cores'))} |"
            )
    return out + [
        "",
        "'same loss': the last step's loss within 2 % of torch's (quantized bases drift a little by design).",
        "",
    ]


def _ort119_table(r: dict) -> list[str]:
    rows = []
    for row in r["train"]:
        by = {
            (v["engine"], v["precision"], v["recompute"]): v for v in row["variants"] if v.get("status") == "measured"
        }
        new, old = by.get(("edgeft", "fp32", "none")), by.get(("ort119", "fp32", "none"))
        if new and old:
            rows.append((row, new, old))
    if not rows:
        return []
    out = [
        "## 2. The new engine against the onnxruntime-training 1.19 engine it replaced",
        "",
        "The old engine reproduced in `worker.py` (`train-ort119`, host venv): `generate_artifacts` over the same loss "
        "module traced with the weights as initializers, nominal checkpoint, every parameter copied into one buffer, "
        "`Module(training, state, eval)` with the memory pattern off, numpy AdamW. Both are fp32 and were measured in "
        "the same cell against the same torch worker; new / old is the ratio of the two.",
        "",
        "| model | LoRA | seq | new s/step | 1.19 s/step | new / 1.19 time | new peak RSS MB | 1.19 peak RSS MB | new / 1.19 RSS | 1.19 / torch time | 1.19 / torch RSS | same loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, new, old in rows:
        same = "yes" if abs(new["loss"] - old["loss"]) < 1e-3 * abs(old["loss"]) else "no"
        out.append(
            f"| {row['model']} | {row['targets']} | {row['seq']} | {new['median_s']:.3f} | {old['median_s']:.3f} | "
            f"{new['median_s'] / old['median_s']:.2f}× | {new['peak_rss_mb']:.0f} | {old['peak_rss_mb']:.0f} | "
            f"{new['peak_rss_mb'] / old['peak_rss_mb']:.2f}× | {old['time_ratio']:.2f}× | {old['rss_ratio']:.2f}× | {same} |"
        )
    return out + [""]


def _decode_table(r: dict) -> list[str]:
    d = r["plan"]["decode"]
    out = [
        "## 3. Decode with KV cache (greedy, adapter loaded)",
        "",
        "edgeft: `TextGenerator.stream` (device venv). Reference: `PeftModel.generate` (unmerged LoRA, same adapter), "
        f"`use_cache=True`, `do_sample=False`. Prompt {d['prompt']} tokens + {d['new_tokens']} new, no early stop, "
        f"{r['plan']['decode_warmup']} warm-up then {r['plan']['decode_repeats']} alternating repeats; tokens/s = new "
        "tokens / whole request (prefill included); ms/token = steady-state step.",
        "",
        "| model | LoRA | edgeft base | edgeft tok/s | transformers tok/s | ratio | edgeft ms/token | transformers ms/token | step ratio | edgeft first token s | transformers first token s | edgeft peak RSS MB | same greedy tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["decode"]:
        out.append(
            f"| {x['model']} | {x['targets']} | {x['precision']} | {x['edgeft_tokens_per_second']:.1f} | "
            f"{x['torch_tokens_per_second']:.1f} | {x['tokens_per_second_ratio']:.2f}× | {x['edgeft_decode_ms_per_token']:.1f} | "
            f"{x['torch_decode_ms_per_token']:.1f} | {x['decode_step_ratio']:.2f}× | {x['edgeft_first_token_s']:.2f} | "
            f"{x['torch_first_token_s']:.2f} | {x['edgeft_peak_rss_mb']:.0f} | {100 * x['same_tokens']:.0f} % |"
        )
    return out + ["", "The same-tokens column compares with the fp32 reference, so quantized bases may differ.", ""]


def _switch(r: dict) -> list[str]:
    s = r["switch"]
    return [
        "## 4. Adapter switch",
        "",
        f"One-token requests (prompt {s['prompt_len']} tokens) on one `Decoder` ({s['model']}, LoRA {s['targets']}), "
        f"{len(s['switched_s'])} pairs: a request whose adapter differs from the previous one, then one with the same "
        "adapter. Added time = median over pairs of (switched − same). On CPU the adapter's arrays are the step's feeds, "
        "so a switch has no work of its own.",
        "",
        "| first step, switched | first step, same adapter | added by the switch (paired) | new `Decoder` session instead |",
        "|---|---|---|---|",
        f"| {1e3 * s['switched_median_s']:.1f} ms | {1e3 * s['same_median_s']:.1f} ms | {s['added_ms']:+.2f} ms | "
        f"{s['new_session_median_s']:.2f} s |",
        "",
    ]


def _cli_table(r: dict) -> list[str]:
    c = r["cli"]
    out = [
        "## 5. Through the CLI: `edgeft train` against the equivalent torch script",
        "",
        f"`edgeft train BUNDLE --data {c['data']} --eval-data examples/data/eval.jsonl --max-steps {c['steps']} --threads 2` "
        f"(device venv) per base precision, and `benchmarks/torch_train.py` (host venv: PEFT eager fp32, sdpa, the "
        "same initial adapter, tokenizer, batches, schedule, clip and AdamW) on "
        f"{c['model']}, LoRA {c['targets']}, batch 4. Wall time and peak RSS are of the whole command (GNU time), "
        "load and both evaluations included. The eval-loss gap is relative to the fp32-base edgeft run.",
        "",
        "| command | wall s | training s | peak RSS MB | wall / torch | RSS / torch | eval loss before → after | gap to fp32 base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    torch = next((x for x in c["runs"] if x["name"].startswith("torch")), None)
    for x in c["runs"]:
        rel = (
            f"{x['wall_seconds'] / torch['wall_seconds']:.2f}× | {x['peak_rss_mb'] / torch['peak_rss_mb']:.2f}×"
            if torch
            else "— | —"
        )
        out.append(
            f"| {x['name']} | {x['wall_seconds']:.1f} | {x['train_seconds']:.1f} | {x['peak_rss_mb']:.0f} | {rel} | "
            f"{x['eval_loss_before']:.4f} → {x['eval_loss']:.4f} | {100 * x['eval_loss_gap']:.2f} % |"
        )
    return out + [""]


def _bundles(r: dict) -> list[str]:
    out = [
        "## 6. Bundles",
        "",
        "| model | bundle | bytes | vs fp32 weights | export s | export peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, built in r["built"].items():
        facts = next(iter(r["models"][name]["facts"].values()))
        for item, meta in built.items():
            if "bytes" not in meta:
                continue
            out.append(
                f"| {name} | {item} | {meta['bytes']:,} | {meta['bytes'] / facts['fp32_weight_bytes']:.3f}× | "
                f"{meta['export_seconds']:.0f} | {meta['export_peak_rss_mb']:.0f} |"
            )
    return out + ["", "Export figures are from the run that built the cache (cached builds keep theirs).", ""]


def _bg(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _optimisations() -> list[str]:
    if not OPTIMISATIONS.is_file():
        return []
    data = json.loads(OPTIMISATIONS.read_text())
    ab = json.loads(AB.read_text()) if AB.is_file() else {}
    out = ["## Optimisations and options, with their measured effect", "", data.get("intro", "")]
    if ab:
        out += [
            "",
            f"A/B figures from `benchmarks/ab.py` ({ab['date']}, {ab.get('mode', 'full')} run, load average "
            f"{ab['load_average_at_start'][0]:.1f} → {ab['load_average_at_end'][0]:.1f}).",
        ]
    out += ["", "| change | where | measured | verdict |", "|---|---|---|---|"]
    for o in data["items"]:
        measured = _ab_text(ab, o["ab"]) if o.get("ab") and o["ab"] in ab else o.get("measured", "")
        out.append(f"| {o['change']} | {o['where']} | {measured} | {o['verdict']} |")
    out += _profile(ab) + _memory_trace(ab)
    if data.get("findings"):
        out += ["", "### Findings behind the verdicts and the limits", ""]
        out += [f"- {x}" for x in data["findings"]]
    return out + [""]


def _ab_text(ab: dict, key: str) -> str:
    x = ab[key]
    if key == "iobinding":
        return (
            "<br>".join(
                f"ctx {ctx}: numpy feeds {v['numpy_feeds']['median_ms']:.1f} ms → IOBinding {v['iobinding']['median_ms']:.1f} ms; "
                f"paired Δ {v['paired_diff_ms']:+.1f} ms"
                for ctx, v in x["contexts"].items()
            )
            + f"<br>same greedy tokens on both paths: {'yes' if x['same_tokens'] else 'NO'}"
        )
    return (
        "<br>".join(
            f"{name}: {v['median_s']:.3f} s/step (min {v['min_s']:.3f}), peak RSS {v['peak_rss_mb']:.0f} MB"
            for name, v in x["variants"].items()
        )
        + f"<br>({x['cell']}, each variant in its own worker, steps interleaved)"
    )


def _profile(ab: dict) -> list[str]:
    if "profile_train" not in ab:
        return []
    t = ab["profile_train"]
    out = [
        "",
        "### Where the time goes (ONNX Runtime profiler, `benchmarks/ab.py`)",
        "",
        f"Kernel time per op type of one edgeft train step ({t['cell']}; {t['kernel_ms_per_run']:.0f} ms of kernels "
        "per step, profiler on).",
        "",
        "| op | ms per step | share |",
        "|---|---|---|",
    ]
    out += [f"| {o['op']} | {o['ms_per_run']:.1f} | {100 * o['share']:.1f} % |" for o in t["ops"]]
    return out


def _memory_trace(ab: dict) -> list[str]:
    if "memory_trace" not in ab:
        return []
    out = [
        "",
        "### Where the memory goes (RSS of each worker sampled every 5 ms through its first step, `benchmarks/ab.py`)",
        "",
        "The first step is where every buffer is first allocated (edgeft also opens its sessions there: "
        "'after load' is before them); later steps reuse ONNX Runtime's arena, so RSS stays at that level. "
        "`ab_results.json` keeps the traces.",
        "",
        "| worker | cell | RSS after load MB | peak in the first step MB | peak at (fraction of the step) | RSS at its end MB | VmHWM after two steps MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in ab["memory_trace"].items():
        out.append(
            f"| {name} | {m['cell']} | {m['after_load_mb']:.0f} | {m['peak_mb']:.0f} | {m['peak_at']:.2f} | "
            f"{m['after_mb']:.0f} | {m['peak_two_steps_mb']:.0f} |"
        )
    return out


def _notes(r: dict) -> list[str]:
    return [
        "## Method",
        "",
        "- Each contender runs in its own worker process (`benchmarks/worker.py`): edgeft in the device venv (plain "
        "onnxruntime, no torch, so its RSS is edgeft's alone), torch + PEFT and the 1.19 engine in the host venv. "
        "Per cell the torch worker alternates steps with one variant at a time (which goes first alternates), so "
        "every ratio is two processes measured in the same minutes; at most two training workers are alive.",
        "- Peak RSS is VmHWM from `/proc/self/status` of each worker (not `ru_maxrss`, which would include the "
        "parent's memory at fork); memory-mapped weight pages count, as they do for a user.",
        "- The models, adapters, bundles and 1.19 artifacts are built once into `benchmarks/.cache/` (gitignored; "
        "`--rebuild` forces it). The recompute variants are built and measured as soon as `ExportConfig` has a "
        "`recompute` field; until then their cells read 'not available yet'.",
        "- This box is shared: compare ratios rather than absolute times, and read the load averages and the "
        "others' cores column.",
        "",
    ]


def other_sections() -> str:
    """The sections measured by their own tools: serve_load.py, genai_decode.py, large.py."""
    return "\n".join(part for part in (_serve_load(), _genai_decode(), _large()) if part)


def _genai_decode() -> str:
    path = HERE / "genai_decode.json"
    if not path.is_file():
        return ""
    sys.path.insert(0, str(HERE))
    from genai_decode import samples_table, table

    d = json.loads(path.read_text())
    m, plan, load = d["meta"], d["plan"], d["load_average"]
    return "\n".join(
        [
            "## Decode against onnxruntime-genai and transformers (`benchmarks/genai_decode.py`, in `make bench`)",
            "",
            f"Greedy tokens/s (1 / the median time between two new tokens), {plan['new_tokens']} new tokens "
            f"after a prompt of each context, median of {plan['repeats']} repeats with the engines interleaved in "
            f"a rotating order, {m['n_params'] / 1e6:.0f}M-parameter model "
            f"(hidden {m['config']['hidden_size']}, {m['config']['num_hidden_layers']} layers), 2 threads each; "
            f"onnxruntime {d['versions']['onnxruntime']}, onnxruntime-genai {d['versions']['onnxruntime_genai']}, "
            f"transformers {d['versions']['transformers']}. Load average {load['before']:.2f} before, "
            f"{load['after']:.2f} after. Targets: edgeft >= 1.0x onnxruntime-genai (its better configuration) "
            "and >= 2x transformers at both contexts, base and adapter.",
            "",
            table(d),
            "",
            samples_table(d),
            "",
        ]
    )


def _large() -> str:
    """`make bench-large` (benchmarks/large.py): the real model sizes."""
    path = HERE / "large_results.json"
    if not path.is_file():
        return ""
    d = json.loads(path.read_text())
    gb = 1024
    rows = [
        "## Real model sizes (`make bench-large`, `benchmarks/large.py`)",
        "",
        "Random bf16 weights from the published configs (examples/shapes), saved sharded as the Hub ships them; "
        "`edgeft export` on the host venv, `edgeft train` (batch 1, seq 256, 3 steps) and `edgeft generate` "
        "(a 110-word prompt) in the torch-free device venv, each its own process; peak RSS is that process's. "
        "Planner: `edgeft plan BUNDLE --batch-size 1 --max-seq-len 256`, error = (plan - measured) / measured. "
        "Targets (Phi-3-mini int4): export <= 20 GB host RSS and <= 30 min; train <= 5 GB; generate <= 3 GB; "
        "planner within +-20 %.",
        "",
        "| model | precision | export min | export peak GB | bundle GB | train peak MB (plan, err) | step s | "
        "train peak with --recompute layers MB (plan, err) | step s | generate peak MB (plan, err) | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    stages = []
    for name, entry in d.items():
        for key, export in entry.items():
            if not key.startswith("export_"):
                continue
            precision = key.removeprefix("export_")
            if "error" in export:
                rows.append(f"| {name} | {precision} | failed: {export['error'].strip().splitlines()[-1][:120]} |")
                continue
            dev = entry.get(f"device_{precision}", {})
            plan = dev.get("plan", {})
            cells = [name, precision, f"{export['seconds'] / 60:.1f}", f"{export['peak_rss_mb'] / gb:.1f}",
                     f"{export['bundle_bytes'] / 2**30:.2f}"]  # fmt: skip
            for run, planned in (("train", "train_peak_mb"), ("train_recompute", "train_recompute_peak_mb")):
                t = dev.get(run)
                if t is None or "error" in t:
                    cells += ["failed" if t else "not run", "–"]
                    continue
                if run == "train" and t.get("recompute"):
                    planned = "train_recompute_peak_mb"  # auto chose recompute
                estimate = plan.get(planned)
                if estimate is not None and t.get("prepack"):  # the int4 layouts pre-packed (--prepack auto)
                    estimate += plan.get("train_prepack_mb", 0.0)
                notes = [n for n, on in (("recompute", t["recompute"]), ("pre-packed", t.get("prepack"))) if on]
                cells += [_vs_plan(t["peak_rss_mb"], estimate) + "".join(f" ({n})" for n in notes),
                          f"{t['step_seconds']:.1f}"]  # fmt: skip
            g = dev.get("generate", {})
            cells += [_vs_plan(g["peak_rss_mb"], plan.get("serve_peak_mb")) if g.get("ok") else "failed",
                      f"{g['decode_tokens_per_second']:.2f}" if "decode_tokens_per_second" in g else "–"]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
            stages.append(
                f"- {name} {precision}: " + ", ".join(f"{k} {v:.0f} s" for k, v in export["stages_s"].items())
            )
    return "\n".join([*rows, "", *_large_sources(d), "Where the export time goes (`export stage:` log lines):", "",
                      *stages, "", *_large_findings(d)])  # fmt: skip


def _large_sources(d: dict) -> list[str]:
    """Which edgeft measured the rows (large.py records it with each export and each row's device runs)."""

    def what(s: dict | None) -> str:
        return f"edgeft {s['commit']}{'' if s['clean'] else ' with uncommitted changes'}" if s else "not recorded"

    seen: dict[str, list[str]] = {}
    for name, entry in d.items():
        for key, export in entry.items():
            if key.startswith("export_"):
                precision = key.removeprefix("export_")
                made, ran = what(export.get("source")), what(entry.get(f"device_{precision}", {}).get("source"))
                label = made if made == ran else f"export {made}, device runs {ran}"
                seen.setdefault(label, []).append(f"{name} {precision}")
    if list(seen) == ["not recorded"]:
        return []
    return ["Measured by: " + "; ".join(f"{label} ({', '.join(rows)})" for label, rows in seen.items()) + ".", ""]


def _large_findings(d: dict) -> list[str]:
    """The Phi-3-mini int4 training peak against its 5 GB target, per --quant-compute, and what limits it."""
    phi = d.get("phi3-mini", {})
    lines = []
    kinds = (
        ("int4", "`--quantize int4` (blocks of 32, `--quant-compute fp32`: the defaults)"),
        ("int4-dequant", "`--quant-compute dequant`"),
        ("int4-b128", "`--quant-block-size 128` (W and Wᵀ layouts, one scale per 128 weights)"),
    )
    for precision, compute in kinds:
        dev = phi.get(f"device_{precision}", {})
        t, plan = dev.get("train_recompute", {}), dev.get("plan", {})
        if "peak_rss_mb" not in t or not plan or "step_seconds" not in t:
            continue
        verdict = "meets" if t["peak_rss_mb"] <= 5 * 1024 else "misses"
        bundle = phi[f"export_{precision}"]["bundle_bytes"] / 2**30
        lines.append(
            f"- {compute}: with `--recompute layers` the step peaks at {t['peak_rss_mb']:.0f} MB ({verdict} 5 GB), "
            f"{t['step_seconds']:.0f} s a step; frozen weights {plan['weights_mb']:.0f} MB, bundle {bundle:.2f} GB."
        )
    if not lines:
        return []
    return [
        "Phi-3-mini int4 training at batch 1 x 256 (target: peak <= 5 GB):",
        "",
        *lines,
        "",
        "`--quantize int4` multiplies by W with MatMulNBits in the forward and by a second int4 layout of Wᵀ in "
        "the backward, pre-packed by `edgeft train --prepack auto` (the default): MLAS repacks the 4-bit data at "
        "session start while edgeft drops the weights file's pages it read (`edgeft/device/weights.py`), and reads "
        "the scales from the file, so the weights cost what is stored (4.5 GB at blocks of 32) and no float32 "
        f"copy of a weight exists; at blocks of 32 the recomputing step {_margin(phi)}, the rest being "
        "~470 MB of activations and arena, the LoRA state and the runtime (a second copy of the initial adapter, "
        "kept alive through the run, cost 29 MB of it until edgeft stopped keeping it). Before "
        "(`--quant-compute int8`, unpacked) it "
        "peaked at 5434 MB and took 103 s a step. `--quant-compute dequant` stores W once and dequantizes one "
        f"layer's weights at a time: smaller, but its recomputing step peaks {_over_plan(phi)} the planner. The ORT "
        "profiler over one such step puts the live tensors at its peak at 1.2 GB beside the 2.3 GB of mapped "
        "weights; the rest is onnxruntime's CPU arena keeping freed blocks, fragmented by those per-layer float32 "
        "weights. Without the arena (and a fixed glibc mmap threshold) one step peaked at 4108 MB, but three steps "
        "at 5860 MB and 179 s a step: not taken. Blocks of 128 (the group size of GPTQ/AWQ checkpoints and of "
        "onnxruntime's own int4 quantizer) make both int4 layouts 15 % smaller and bring the recomputing step to "
        "4.5 GB; the default block stays 32 (the accuracy cost of 128 is not measured here).",
        "",
        "The planner counts, for int4 training through MatMulNBits, the float32 temporary of an unpacked call "
        "(`--prepack off`: onnxruntime's MatMulNBits without its packed layout dequantizes its whole weight per "
        "call; the largest is the head, Llama-3.2-1B's tied 128256 x 2048: 1002 MB, Phi-3-mini's 394 MB), and "
        "`train_prepack_mb`, what pre-packing changes (minus that temporary; int8 compute's layout adds block "
        "sums). A probe that sampled RSS per ORT node through one step found that call adding 1.7 GB at the "
        "head's forward; RSS at session start gave the packed layout's size (0.50 bytes per weight with fp32 "
        "compute, the 4-bit data; 0.75 with int8). Before, the Llama-3.2-1B int4 rows were planned 21-34 % low. "
        "Unpacked, the same Llama-3.2-1B int4 runs peaked at 3982 / 3324 MB and took 16.4 / 25.2 s a step. "
        "The plans of rows measured earlier are `large.py --replan` of the bundles they measured.",
        "",
    ]


def _over_plan(phi: dict) -> str:
    """The dequant bundle's recomputing peak against its plan."""
    dev = phi.get("device_int4-dequant", {})
    peak, plan = dev.get("train_recompute", {}).get("peak_rss_mb"), dev.get("plan", {}).get("train_recompute_peak_mb")
    return f"{peak / plan - 1:.0%} above" if peak and plan else "(not measured) against"


def _margin(phi: dict) -> str:
    """How far the default int4 bundle's recomputing step is from the 5 GB target."""
    peak = phi.get("device_int4", {}).get("train_recompute", {}).get("peak_rss_mb")
    if peak is None:
        return "was not measured"
    gap = 5 * 1024 - peak
    return f"stays under 5 GB by {gap:.0f} MB" if gap >= 0 else f"is {-gap:.0f} MB over 5 GB"


def _vs_plan(measured: float, planned: float | None) -> str:
    if not planned:
        return f"{measured:.0f}"
    return f"{measured:.0f} ({planned:.0f}, {(planned - measured) / measured:+.0%})"


def _serve_load() -> str:
    """The serving load test (benchmarks/serve_load.py), measured by its own tool."""
    path = HERE / "serve_load.json"
    if not path.is_file():
        return ""
    d = json.loads(path.read_text())
    lat, rss = d["latency_ms"], d["rss_mb"]
    return "\n".join(
        [
            "## Serving under load (`python benchmarks/serve_load.py`, also `tests/test_serve_load.py`)",
            "",
            f"A real `edgeft serve` process (tiny llama bundle, base + 2 adapters, `--max-queue {d['max_queue']}`) on "
            f"loopback, {d['clients']} concurrent clients x {d['requests_per_client']} requests mixing models, "
            "completions and chat, streaming and not.",
            "",
            "| requests | 200 | 503 (queue full, deliberate) | other 5xx | transport errors | req/s | p50 / p95 / p99 ms | server RSS start -> end | alive after |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {d['requests']} | {d['ok']} | {d['busy_503']} | {d['server_errors_other']} | {d['transport_errors']} | "
            f"{d['requests_per_s']:.0f} | {lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f} | "
            f"{rss['start']:.0f} -> {rss['end']:.0f} MB (+{rss['growth']:.1f}) | {d['health_after']} |",
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------
# scaling.png


def plot(r: dict, path: Path) -> None:
    """Step time and peak RSS against seq, edgeft (fp32 and int4 bases, no recompute; recompute
    when measured) and torch + PEFT, one line per MLP ratio; one row per LoRA target set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({row["targets"] for row in r["train"]})
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4.2 * len(targets)), squeeze=False)
    for ax_row, t in zip(axes, targets):
        for metric, ax in zip(("seconds", "rss"), ax_row):
            _plot_panel(ax, r, t, metric)
    fig.suptitle(f"{r['mode']} run — {r['machine']['cpu']}, {r['threads']} threads, batch 4")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_panel(ax, r: dict, targets: str, metric: str) -> None:
    llama = [s for s in r["models"].values() if s["layout"] == "llama"]
    for k, spec in enumerate(llama):
        rows = sorted(
            (x for x in r["train"] if x["model"] == spec["name"] and x["targets"] == targets), key=lambda x: x["seq"]
        )
        color = f"C{k}"
        lines = _series(rows, metric)
        for (label, style), (xs, ys) in lines.items():
            if xs:
                ax.plot(xs, ys, style, color=color, label=f"{label}, MLP {spec['mlp_ratio']}×")
    ax.set(
        xlabel="sequence length",
        ylabel="seconds per train step" if metric == "seconds" else "peak RSS (MB)",
        title=f"{'Train step time' if metric == 'seconds' else 'Peak training RSS'} — LoRA {targets}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _series(rows: list[dict], metric: str) -> dict:
    """(label, style) -> (seqs, values) for torch and each plotted edgeft variant."""
    wanted = [
        ("edgeft fp32", "fp32", "none", "o-"),
        ("edgeft int4", "int4", "none", "^:"),
        ("edgeft fp32 recompute", "fp32", "layers", "D-."),
    ]
    out = {("torch + PEFT fp32", "s--"): ([], [])}
    for label, p, rc, style in wanted:
        out[(label, style)] = ([], [])
        for row in rows:
            v = next(
                (
                    v
                    for v in row["variants"]
                    if v.get("status") == "measured"
                    and v["engine"] == "edgeft"
                    and v["precision"] == p
                    and v["recompute"] == rc
                ),
                None,
            )
            if v is None:
                continue
            out[(label, style)][0].append(row["seq"])
            out[(label, style)][1].append(v["median_s"] if metric == "seconds" else v["peak_rss_mb"])
            if p == "fp32" and rc == "none":  # torch: the steps interleaved with edgeft fp32
                out[("torch + PEFT fp32", "s--")][0].append(row["seq"])
                out[("torch + PEFT fp32", "s--")][1].append(
                    v["torch_median_s"] if metric == "seconds" else row["torch_peak_rss_mb"]
                )
    return out


def write(r: dict, out: Path) -> None:
    """RESULTS.md and scaling.png into ``out``; the sections of the other tools only into benchmarks/."""
    plot(r, out / "scaling.png")
    others = "\n" + other_sections() if out.resolve() == HERE.resolve() else ""
    (out / "RESULTS.md").write_text(markdown(r) + others)


def rewrite() -> None:
    """RESULTS.md again from the committed results, after a tool of its own sections ran."""
    (HERE / "RESULTS.md").write_text(
        markdown(json.loads((HERE / "results.json").read_text())) + "\n" + other_sections()
    )


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    results = json.loads((HERE / "results.json").read_text())
    derive(results)
    write(results, HERE)
    print(summary_table(results))
