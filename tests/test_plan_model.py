"""`edgeft plan MODEL_DIR`: planning before export, from config.json alone.

The per-precision estimates reuse the bundle planner's measured formulas (tests/test_planner.py
holds those to ±20 % of real runs); here: the shapes read from a config give transformers' own
parameter count on the published dimensions of Llama-3.2-1B, Qwen2.5-0.5B, Qwen3-0.6B and
Gemma-3-1B (examples/shapes/), the model plan of a tiny model equals the bundle plan of its
export, and the command runs torch-free in the device venv.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from edgeft.bundle import Bundle
from edgeft.cli import main
from edgeft.device.planner import DEVICE_RUNTIME_MB, PRECISIONS, RECOMPUTE, _frozen_shapes, _Shape, plan, plan_model

SHAPES = sorted((ROOT / "examples" / "shapes").iterdir())
DEVICE = os.environ.get("EDGEFT_DEVICE_VENV")


@pytest.mark.parametrize("model_dir", SHAPES, ids=[p.name for p in SHAPES])
def test_parameter_count_equals_transformers(model_dir):
    """Every frozen tensor the planner counts, against the model transformers builds (meta device:
    no memory) from the same config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    want = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    got = sum(rows * cols for _, rows, cols in _frozen_shapes(config, _Shape.from_config(config)))
    # The planner assumes up to 4 norms of hidden and 2 of head_dim per layer (gemma3's): exact
    # for gemma3, at most 0.02 % over for the others.
    assert want <= got <= want * 1.0002, (got, want)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("precision", ["fp32", "int4", "int4-dequant"])
def test_model_plan_equals_bundle_plan(factory, model_type, precision):
    """Planned from config.json before export vs planned from the exported bundle (the same
    runtime figure): weights, LoRA state and both peaks within 2 % (norm sizes aside, the same shapes)."""
    model_dir = factory.model(model_type)
    scheme, _, compute = precision.partition("-")
    options = {} if precision == "fp32" else {"quantize": scheme, **({"quant_compute": compute} if compute else {})}
    bundle = Bundle.open(factory.bundle(model_type, **options))
    want = plan(bundle, 2, 64, runtime_mb=DEVICE_RUNTIME_MB)
    config = json.loads((model_dir / "config.json").read_text())
    rows = plan_model(config, 2, 64, None)
    got = next(r.plan for r in rows if r.precision == precision and r.recompute == "none")
    for field in ("weights_mb", "lora_state_mb", "train_activations_mb", "train_peak_mb", "serve_peak_mb"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=0.02), field


def test_recompute_keeps_less_and_fits_are_judged_on_both_peaks():
    config = json.loads((ROOT / "examples" / "shapes" / "gemma-3-1b" / "config.json").read_text())
    rows = plan_model(config, 4, 512, 6144)
    assert [(r.precision, r.recompute) for r in rows] == [(p, c) for p in PRECISIONS for c in RECOMPUTE]
    by = {(r.precision, r.recompute): r for r in rows}
    for p in PRECISIONS:
        none, layers = by[p, "none"], by[p, "layers"]
        assert layers.train_peak_mb < none.train_peak_mb and layers.plan.weights_mb == none.plan.weights_mb
        assert layers.as_dict()["train_activations_mb"] < none.as_dict()["train_activations_mb"]
    # int4 also stores each linear Wᵀ for its low-precision backward: with Gemma's tied 262k-row
    # embedding that is more than int8's one layout; serving reads W's layout only.
    weights = {p: by[p, "none"].plan.weights_mb for p in PRECISIONS}
    assert weights["fp32"] > weights["int4"] > weights["int8"] * 0.9 and weights["fp32"] > weights["int8"]
    assert weights["int4-dequant"] < weights["int4"] / 1.5  # no Wᵀ layout
    assert by["int4-dequant", "layers"].plan.serve_peak_mb == pytest.approx(by["int4", "layers"].plan.serve_peak_mb)
    assert by["int4", "none"].plan.serve_peak_mb < by["int8", "none"].plan.serve_peak_mb
    for r in rows:
        assert r.fits is (max(r.train_peak_mb, r.plan.serve_peak_mb) <= 6144)


def test_cli_table_and_json(tmp_path):
    model = ROOT / "examples" / "shapes" / "qwen2.5-0.5b"
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(model), "--profile", "raspberry-pi-5", "--max-seq-len", "256"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("model     qwen2, 494 M parameters") and "6144 MB (profile raspberry-pi-5)" in lines[2]
    table = lines[lines.index(next(x for x in lines if x.startswith("PRECISION"))) + 1 :][:8]
    assert [x.split()[:2] for x in table] == [
        [p, c + ("*" if c == "layers" else "")] for p in PRECISIONS for c in RECOMPUTE
    ]
    assert any(x.startswith("export:   edgeft export") for x in lines)
    result = runner.invoke(main, ["plan", str(model), "--memory-budget", "1000", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["budget_mb"] == 1000 and len(report["plans"]) == 8
    assert {p["max_seq_len"] for p in report["plans"]} == {512}  # no profile: 512
    assert [p["fits"] for p in report["plans"]] == [
        max(p["train_peak_mb"], p["serve_peak_mb"]) <= 1000 for p in report["plans"]
    ]


def test_cli_refuses_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    result = CliRunner().invoke(main, ["plan", str(tmp_path), "--memory-budget", "1000"])
    assert result.exit_code == 2 and "model_type 'gpt2' is not supported" in result.output


def test_bundle_plan_with_a_budget(factory):
    runner = CliRunner()
    path = str(factory.bundle("llama"))
    plain = runner.invoke(main, ["plan", path, "--json"])
    fits = runner.invoke(main, ["plan", path, "--json", "--memory-budget", "100000"])
    tight = runner.invoke(main, ["plan", path, "--memory-budget", "10"])
    assert "fits" not in json.loads(plain.output) and json.loads(fits.output)["fits"] is True
    assert tight.exit_code == 0 and tight.output.splitlines()[-1] == "budget    10 MB: does not fit"


@pytest.mark.skipif(not DEVICE, reason="EDGEFT_DEVICE_VENV not set (make test sets it)")
def test_plans_a_model_in_the_torch_free_device_venv():
    model = ROOT / "examples" / "shapes" / "gemma-3-1b"
    code = (
        "import sys; sys.argv = ['edgeft', 'plan', sys.argv[1], '--profile', 'raspberry-pi-5'];"
        "from edgeft.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    result = subprocess.run(
        [str(Path(DEVICE) / "bin" / "python"), "-c", code, str(model)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "gemma3_text, 1000 M parameters" in result.stdout
    # vocabulary 262144: the chunked loss head keeps 128 rows of logits, so with layer recomputation
    # every precision fits the 6 GB board at batch 4 x 512, without it none does
    rows = [line.split() for line in result.stdout.splitlines()]
    fits = {(r[0], r[1]): r[-1] for r in rows if len(r) == 6 and r[-1] in ("yes", "no")}
    assert len(fits) == 8 and all(v == ("yes" if rc == "layers*" else "no") for (_, rc), v in fits.items()), fits
    assert "edgeft train then recomputes layers" in result.stdout
