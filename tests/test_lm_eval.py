"""lm-evaluation-harness against ``edgeft serve``: its ``local-completions`` model (log-likelihoods
from ``echo`` + ``logprobs``, greedy generations over HTTP) scores the repo's two tasks
(``examples/lm_eval``: a multiple-choice task and a generation task over a bundled JSONL, nothing
downloaded) exactly as its ``hf`` model does with the same PEFT adapter on the host.

Both run through ``lm_eval.simple_evaluate``, what the ``lm_eval`` command calls, in this process
(the server in a thread): two fresh interpreters importing torch, transformers and datasets would
double the test's time. The README shows the same run with the ``lm_eval`` command.
"""

from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT
from helpers import make_peft_adapter, running

from edgeft.device.generate import TextGenerator
from edgeft.device.server import create_app

TASKS = ["stations_mc", "stations_gen"]
ADAPTER = "tuned"
LIMIT = 10  # documents per task (of 24): 40 log-likelihoods and 10 generations


def _evaluate(model: str, model_args: dict, batch_size: int = 1) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    tasks = TaskManager(include_path=str(ROOT / "examples" / "lm_eval"))
    return lm_eval.simple_evaluate(
        model=model,
        model_args=args,
        tasks=TASKS,
        task_manager=tasks,
        batch_size=batch_size,
        device="cpu",
        limit=LIMIT,
        log_samples=True,
    )


def test_lm_eval_scores_edgeft_serve_like_hf_peft(factory, tmp_path, monkeypatch):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-eval is missing from the host venv; `make venv` installs it (the dev extra)", pytrace=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # the local JSONL's cache
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root
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
        edge = _evaluate("local-completions", served, batch_size=4)  # 4 prompts per request
    hf = _evaluate("hf", {"pretrained": model_dir, "peft": adapter, "dtype": "float32", "max_length": 128})

    assert edge["results"]["stations_mc"]["acc,none"] == hf["results"]["stations_mc"]["acc,none"]
    assert edge["results"]["stations_gen"]["exact_match,strip"] == hf["results"]["stations_gen"]["exact_match,strip"]
    # Every log-likelihood (4 choices per document) within 1e-4, the greedy flags equal, and every
    # generated answer identical.
    mc_edge = sorted(edge["samples"]["stations_mc"], key=lambda s: s["doc_id"])
    mc_hf = sorted(hf["samples"]["stations_mc"], key=lambda s: s["doc_id"])
    assert len(mc_edge) == len(mc_hf) == LIMIT
    for a, b in zip(mc_edge, mc_hf, strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(
            [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True
        ):
            assert abs(float(ll_a) - float(ll_b)) <= 1e-4 and greedy_a == greedy_b
    gen_edge = sorted(edge["samples"]["stations_gen"], key=lambda s: s["doc_id"])
    gen_hf = sorted(hf["samples"]["stations_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"] for s in gen_edge] == [s["resps"] for s in gen_hf]
    assert any(s["resps"][0][0].strip() for s in gen_edge)  # something was generated
