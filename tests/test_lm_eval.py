"""lm-evaluation-harness against ``edgeft serve``: its ``local-completions`` model (log-likelihoods
from ``echo`` + ``logprobs``, greedy generations) scores the repo's two tasks
(``examples/lm_eval``: a multiple-choice task and a generation task over a bundled JSONL, nothing
downloaded) exactly as its ``hf`` model does with the same PEFT adapter on the host."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import make_peft_adapter, running

from edgeft.device.generate import TextGenerator
from edgeft.device.server import create_app

TASKS = "stations_mc,stations_gen"
ADAPTER = "tuned"
LIMIT = 10  # documents per task (of 24): 40 log-likelihoods and 10 generations, in ~1 minute


def _lm_eval(model: str, model_args: dict, out: Path, home: Path) -> tuple[dict, dict[str, list]]:
    """Run ``python -m lm_eval`` offline; returns (results, {task: samples})."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),  # the datasets cache of the local JSONL, kept out of ~/.cache
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", args, "--tasks", TASKS]
    cmd += ["--include_path", "examples/lm_eval", "--batch_size", "1", "--limit", str(LIMIT)]
    cmd += ["--output_path", str(out), "--log_samples"]
    cmd += ["--device", "cpu"] if model == "hf" else []
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for task in TASKS.split(","):
        path = next(out.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return results, samples


def test_lm_eval_scores_edgeft_serve_like_hf_peft(factory, tmp_path):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-eval is missing from the host venv; `make venv` installs it (the dev extra)", pytrace=False)
    model_dir = factory.model("llama")
    bundle = factory.bundle("llama")
    adapter = make_peft_adapter(model_dir, tmp_path / "peft", targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    gen = TextGenerator(bundle, provider="cpu")
    gen.decoder.add_adapter(ADAPTER, adapter)
    with running(create_app(gen, max_queue=4)) as url:
        served = {
            "base_url": f"{url}/v1/completions",
            "model": ADAPTER,
            "tokenizer": bundle,
            "tokenizer_backend": "huggingface",
            # The hf model tokenizes as the tokenizer does by default (a BOS here); the API models
            # add no special tokens unless told to.
            "add_bos_token": True,
            "max_length": 128,
            "max_retries": 1,
        }
        edge, edge_samples = _lm_eval("local-completions", served, tmp_path / "edgeft", tmp_path / "hf-home")
    reference = {"pretrained": model_dir, "peft": adapter, "dtype": "float32", "max_length": 128}
    hf, hf_samples = _lm_eval("hf", reference, tmp_path / "hf", tmp_path / "hf-home")

    assert edge["stations_mc"]["acc,none"] == hf["stations_mc"]["acc,none"]
    assert edge["stations_gen"]["exact_match,strip"] == hf["stations_gen"]["exact_match,strip"]
    # Every log-likelihood (4 choices per document) within 1e-4, the greedy flags equal, and every
    # generated answer identical.
    mc_edge = sorted(edge_samples["stations_mc"], key=lambda s: s["doc_id"])
    mc_hf = sorted(hf_samples["stations_mc"], key=lambda s: s["doc_id"])
    assert len(mc_edge) == len(mc_hf) == LIMIT
    for a, b in zip(mc_edge, mc_hf, strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
        ):
            assert abs(float(ll_a) - float(ll_b)) <= 1e-4 and greedy_a == greedy_b
    gen_edge = sorted(edge_samples["stations_gen"], key=lambda s: s["doc_id"])
    gen_hf = sorted(hf_samples["stations_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"] for s in gen_edge] == [s["resps"] for s in gen_hf]
    assert any(s["resps"][0][0].strip() for s in gen_edge)  # something was generated
