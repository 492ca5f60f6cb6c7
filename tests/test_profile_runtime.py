"""Profiles drive the runtime: providers with a CPU fallback, aarch64 profiles that train, the memory guard."""

from __future__ import annotations

import json

from click.testing import CliRunner
from conftest import DATA

from edgeft.cli import main


def _train(bundle, out, *extra):
    args = [
        "train",
        str(bundle),
        "--data",
        str(DATA / "train.jsonl"),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--no-progress",
        *extra,
    ]
    return CliRunner().invoke(main, args)


def test_memory_guard_refuses_with_estimate_and_way_out(llama_bundle, tmp_path):
    result = _train(llama_bundle, tmp_path / "run", "--memory-budget", "20", "--batch-size", "8")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert (
        line.startswith("error: training needs about")
        and "--batch-size 4 --grad-accum 2" in line
        and "--memory-budget" in line
    )
    assert len(line.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_memory_guard_lets_a_fitting_run_through(llama_bundle, tmp_path):
    result = _train(llama_bundle, tmp_path / "run", "--memory-budget", "4000")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2


def test_aarch64_profile_trains(llama_bundle, tmp_path):
    """raspberry-pi-5 was serve-only (no aarch64 training wheel); plain onnxruntime trains there now,
    so `train --profile raspberry-pi-5` runs, on the CPU, with the profile's thread count."""
    result = _train(llama_bundle, tmp_path / "run", "--profile", "raspberry-pi-5")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2
    assert "not available here" not in result.stderr  # CPU is what the profile asks for
    assert (tmp_path / "run" / "adapter").is_dir()


def test_missing_provider_falls_back_to_cpu_with_a_message(llama_bundle, tmp_path, monkeypatch):
    import onnxruntime

    # The fallback is what this test is about: where CUDA or OpenVINO exist, they are hidden (so the
    # test runs everywhere instead of passing without checking anything); test_cuda.py covers CUDA.
    missing = ("CUDAExecutionProvider", "OpenVINOExecutionProvider")
    available = [p for p in onnxruntime.get_available_providers() if p not in missing]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    result = _train(llama_bundle, tmp_path / "run", "--profile", "x86_64-cuda")
    assert result.exit_code == 0, result.stderr
    assert (
        "CUDAExecutionProvider is not available here" in result.stderr and "using CPUExecutionProvider" in result.stderr
    )
    generated = CliRunner().invoke(
        main,
        ["generate", str(llama_bundle), "--prompt", "Station", "--max-new-tokens", "4", "--profile", "intel-openvino"],
    )
    assert generated.exit_code == 0, generated.stderr
    assert "OpenVINOExecutionProvider is not available here" in generated.stderr
