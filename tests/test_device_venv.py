"""The device side in a torch-free virtual environment (only the `device` extra installed).

`make test` builds that environment (.venv-device) and points EDGEFT_DEVICE_VENV at it; the
bundle is exported here, in the host environment, and trained/evaluated there.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import DATA

BANNED = ("torch", "transformers", "peft", "optimum")
VENV = os.environ.get("EDGEFT_DEVICE_VENV")
pytestmark = pytest.mark.skipif(not VENV, reason="EDGEFT_DEVICE_VENV not set (make test sets it)")

# Runs the CLI in-process so the test can then look at what got imported.
PROBE = """
import json, sys
from edgeft.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    banned = [m for m in {banned!r} if m in sys.modules]
    print(json.dumps({{"banned_imported": banned}}), file=sys.stderr)
"""


def _device(*args: str) -> subprocess.CompletedProcess:
    python = Path(VENV) / "bin" / "python"
    code = PROBE.format(banned=BANNED)
    return subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=600)


def test_device_venv_has_no_host_stack():
    python = Path(VENV) / "bin" / "python"
    for module in ("torch", "transformers", "peft", "optimum"):
        probe = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module


def test_device_trains_and_evaluates_host_bundle(llama_bundle, tmp_path):
    run = tmp_path / "run"
    trained = _device(
        "train",
        str(llama_bundle),
        "--data",
        str(DATA / "train.jsonl"),
        "--eval-data",
        str(DATA / "eval.jsonl"),
        "--out",
        str(run),
        "--max-steps",
        "30",
        "--lr",
        "1e-2",
        "--batch-size",
        "8",
        "--no-progress",
    )
    assert trained.returncode == 0, trained.stderr
    assert json.loads(trained.stderr.strip().splitlines()[-1]) == {"banned_imported": []}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["eval_loss"] < summary["eval_loss_before"]
    evaluated = _device(
        "eval", str(llama_bundle), "--data", str(DATA / "eval.jsonl"), "--adapter", str(run / "adapter")
    )
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert json.loads(evaluated.stderr.strip().splitlines()[-1]) == {"banned_imported": []}
