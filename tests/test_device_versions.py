"""The device on the onnxruntime versions it supports: the newest plain onnxruntime (.venv-device),
the oldest (``onnxruntime==1.20.*``, .venv-device-ort120) and the host's 1.19 training build give
the same eval loss, training loss, LoRA gradients and greedy tokens for the same bundle and adapter.

`make test` builds both device venvs and points EDGEFT_DEVICE_VENV / EDGEFT_OLD_DEVICE_VENV at them.
Measured (tiny models): losses equal to ~1e-7 relative, gradients to ~1e-6, tokens identical.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA
from helpers import make_peft_adapter

VENVS = {"newest": os.environ.get("EDGEFT_DEVICE_VENV"), "1.20": os.environ.get("EDGEFT_OLD_DEVICE_VENV")}
pytestmark = pytest.mark.skipif(
    not all(VENVS.values()), reason="EDGEFT_DEVICE_VENV / EDGEFT_OLD_DEVICE_VENV not set (make test sets them)"
)
PROMPT = "Station old mill: fan is noisy. What should the crew do?"
# One bundle per code path: fp32 llama, DoRA phi3 (fused projections), int4 qwen2 (tied embedding, MatMulNBits).
CASES = {"llama": {}, "phi3-dora": {"use_dora": True}, "qwen2-int4": {"quantize": "int4"}}

PROBE = """
import json, sys
import numpy as np
from edgeft.bundle import Bundle
from edgeft.device.adapter import load_adapter
from edgeft.device.data import load_examples, make_batches
from edgeft.device.decoder import Sampling
from edgeft.device.generate import TextGenerator
from edgeft.device.runtime import LoraGraphs
from edgeft.device.tokenizer import BundleTokenizer
import onnxruntime

bundle_dir, adapter, data, prompt, out = sys.argv[1:6]
bundle = Bundle.open(bundle_dir)
lora = load_adapter(adapter, bundle)
tok = BundleTokenizer.from_dir(bundle.root)
batch = make_batches(load_examples(data, tok, 128)[:6], 3, tok.pad_token_id, seed=0, epoch=0)[0]
graphs = LoraGraphs(bundle)
eval_loss = graphs.loss(lora, batch, float(batch.num_loss_tokens))
loss, grads = graphs.loss_and_grads(lora, batch, float(batch.num_loss_tokens))
gen = TextGenerator(bundle.root)
gen.decoder.add_adapter("a", adapter)
stream = gen.stream(gen.encode(prompt), "a", Sampling(max_new_tokens=16))
"".join(stream)  # runs the generation
tokens = stream.tokens
np.savez(out, **{"grad." + k: v for k, v in grads.items()})
print(json.dumps({"version": onnxruntime.__version__, "eval_loss": eval_loss, "loss": loss, "tokens": tokens}))
"""


def _probe(python: str, bundle: Path, adapter: Path, out: Path) -> tuple[dict, dict]:
    args = [python, "-c", PROBE, str(bundle), str(adapter), str(DATA / "train.jsonl"), PROMPT, str(out)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    grads = dict(np.load(out))
    return result, grads


@pytest.mark.parametrize("case", list(CASES))
def test_same_results_on_every_supported_onnxruntime(factory, tmp_path, case):
    import sys

    model_type = case.split("-")[0]
    path = factory.bundle(model_type, **CASES[case])
    targets = json.loads((path / "manifest.json").read_text())["lora"]["target_modules"]
    adapter = make_peft_adapter(
        factory.model(model_type), tmp_path / "peft", targets=targets, b_std=0.3, use_dora="dora" in case
    )
    runs = {"host": _probe(sys.executable, path, adapter, tmp_path / "host.npz")}
    for name, venv in VENVS.items():
        runs[name] = _probe(str(Path(venv) / "bin" / "python"), path, adapter, tmp_path / f"{name}.npz")
    versions = {name: result["version"] for name, (result, _) in runs.items()}
    assert versions["host"].startswith("1.19") and versions["1.20"].startswith("1.20."), versions
    assert tuple(int(x) for x in versions["newest"].split(".")[:2]) > (1, 20), versions
    ref, ref_grads = runs["host"]
    assert len(ref["tokens"]) >= 8 and len(ref_grads) > 0
    for name, (result, grads) in runs.items():
        assert result["tokens"] == ref["tokens"], name
        assert result["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5), name
        assert result["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
        assert set(grads) == set(ref_grads), name
        for key, want in ref_grads.items():
            err = np.abs(grads[key] - want).max() / np.abs(want).max()
            assert err <= 1e-4, (name, key, err)
