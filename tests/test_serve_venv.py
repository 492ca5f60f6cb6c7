"""Serving with plain onnxruntime (>= 1.20, no training build): a device that cannot train still
serves, with the same tokens as the training build. `make test` builds .venv-serve for this."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from helpers import make_peft_adapter

from edgeft.device.generate import GenerateConfig, generate

VENV = os.environ.get("EDGEFT_SERVE_VENV")
pytestmark = pytest.mark.skipif(not VENV, reason="EDGEFT_SERVE_VENV not set (make test sets it)")
PROMPT = "Station old mill: fan is noisy. What should the crew do?"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(VENV) / "bin" / "edgeft"), *args], capture_output=True, text=True, timeout=300)


def test_plain_onnxruntime_is_installed_without_training():
    python = str(Path(VENV) / "bin" / "python")
    code = "import onnxruntime as o, importlib.util as u; print(o.__version__, u.find_spec('onnxruntime.training') is None)"
    version, no_training = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 20) and no_training == "True"


def test_generate_matches_training_build(factory, tmp_path):
    bundle = factory.bundle("llama")
    adapter = make_peft_adapter(factory.model("llama"), tmp_path / "peft", targets=["q_proj", "v_proj"], b_std=0.3)
    expected = generate(GenerateConfig(bundle, PROMPT, adapter=adapter, max_new_tokens=24), io.StringIO())
    plain = _run("generate", str(bundle), "--prompt", PROMPT, "--adapter", str(adapter), "--max-new-tokens", "24")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == expected + "\n"


def test_training_is_refused_clearly(factory, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello there"}\n')
    result = _run("train", str(factory.bundle("llama")), "--data", str(data), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "onnxruntime-training" in result.stderr
    assert not (tmp_path / "run").exists()
