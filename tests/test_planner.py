"""Memory planner vs reality: estimates within ±20 % of the measured peak RSS of real training
and serving runs at four sizes, each measured in its own process in the torch-free device venv."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import DATA

DEVICE = os.environ.get("EDGEFT_DEVICE_VENV")
pytestmark = pytest.mark.skipif(not DEVICE, reason="EDGEFT_DEVICE_VENV not set (make test sets it)")
CASES = [("tiny", 2, 64), ("demo", 4, 256), ("small", 2, 256), ("small-phi3", 4, 256)]
SERVE_PROBE = """
import sys
from edgeft.device.decoder import Sampling
from edgeft.device.generate import TextGenerator
from edgeft.device.planner import peak_rss_mb
gen = TextGenerator(sys.argv[1])
seq = int(sys.argv[2])
prompt = gen.tokenizer.encode(open(sys.argv[3]).read())[: seq - 8]
list(gen.stream(prompt, "base", Sampling(max_new_tokens=8)))
print(peak_rss_mb())
"""


@pytest.fixture(scope="module")
def long_text(tmp_path_factory) -> tuple[Path, Path]:
    words = (DATA / "corpus.txt").read_text().split()
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("planner")
    data = root / "long.jsonl"
    data.write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(800))}) + "\n" for _ in range(16))
    )
    prompt = root / "prompt.txt"
    prompt.write_text(" ".join(rng.choice(words) for _ in range(800)))
    return data, prompt


def _bundle(factory, size: str) -> Path:
    if size == "tiny":
        return factory.bundle("llama")
    key = ("sized", size)
    if key not in factory.cache:
        from edgeft.host.export import ExportConfig, export_bundle
        from edgeft.host.tiny import make_tiny_model

        shape, _, model_type = size.partition("-")
        model = make_tiny_model(model_type or "llama", factory.root / f"model-{size}", size=shape)
        factory.cache[key] = export_bundle(ExportConfig(model, factory.root / f"bundle-{size}", max_seq_len=512))
    return factory.cache[key]


def _run(venv: str, *args: str) -> str:
    result = subprocess.run([str(Path(venv) / "bin" / args[0]), *args[1:]], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _plan(venv: str, bundle: Path, batch: int, seq: int) -> dict:
    out = _run(venv, "edgeft", "plan", str(bundle), "--batch-size", str(batch), "--max-seq-len", str(seq), "--json")
    return json.loads(out)


TRAIN_CASES = [(*case, "none") for case in CASES] + [("demo", 4, 256, "layers"), ("small-phi3", 4, 256, "layers")]


@pytest.mark.parametrize(
    ("size", "batch", "seq", "recompute"), TRAIN_CASES, ids=[f"{c[0]}-{c[3]}" for c in TRAIN_CASES]
)
def test_training_estimate_within_20_percent(factory, long_text, tmp_path, size, batch, seq, recompute):
    bundle = _bundle(factory, size)
    plan = _plan(DEVICE, bundle, batch, seq)
    estimate = plan["train_recompute_peak_mb" if recompute == "layers" else "train_peak_mb"]
    _run(
        DEVICE,
        "edgeft",
        "train",
        str(bundle),
        "--data",
        str(long_text[0]),
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "2",
        "--batch-size",
        str(batch),
        "--max-seq-len",
        str(seq),
        "--truncate",
        "--no-progress",
        "--recompute",
        recompute,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    measured = summary["peak_rss_mb"]
    assert summary["recompute"] is (recompute == "layers")
    _assert_within(estimate, measured, plan["runtime_mb"])


@pytest.mark.parametrize(("size", "batch", "seq"), CASES, ids=[c[0] for c in CASES])
def test_serving_estimate_within_20_percent(factory, long_text, size, batch, seq):
    bundle = _bundle(factory, size)
    plan = _plan(DEVICE, bundle, 1, seq)
    measured = float(_run(DEVICE, "python", "-c", SERVE_PROBE, str(bundle), str(seq), str(long_text[1])).strip())
    _assert_within(plan["serve_peak_mb"], measured, plan["runtime_mb"])


def _assert_within(estimate: float, measured: float, baseline: float) -> None:
    """±20 % on the total, and on the modelled part alone (total minus the measured runtime
    baseline, which the planner reads rather than models): a good baseline cannot hide a bad model.
    The modelled part gets 10 MB of slack: on the tiny model it is ~30 MB, mostly the fixed session
    overhead fitted on 27-364 MB models (measured there: 23 MB modelled, 31 MB actual)."""
    assert abs(estimate - measured) <= 0.2 * measured, f"estimate {estimate:.0f} MB vs measured {measured:.0f} MB"
    modelled, actual = estimate - baseline, measured - baseline
    assert abs(modelled - actual) <= max(0.2 * actual, 10.0), (
        f"modelled part {modelled:.0f} MB vs measured {actual:.0f} MB above the {baseline:.0f} MB runtime baseline"
    )
