"""CUDA execution provider (onnxruntime-training==1.19.2 CUDA build on an NVIDIA GPU).

These run only where CUDAExecutionProvider is available and skip cleanly elsewhere (CI has no GPU).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import DATA

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="no CUDAExecutionProvider (no GPU or CPU build)",
)


def test_training_on_cuda_matches_cpu(llama_bundle, tmp_path):
    from edgeft.device.train import TrainConfig, train

    runs = {}
    for provider in ("cpu", "cuda"):
        cfg = TrainConfig(
            llama_bundle,
            DATA / "train.jsonl",
            tmp_path / provider,
            max_steps=5,
            lr=5e-3,
            provider=provider,
            progress=False,
        )
        runs[provider] = train(cfg)["losses"]
    np.testing.assert_allclose(runs["cuda"], runs["cpu"], rtol=1e-3)


def test_generation_on_cuda_matches_cpu(llama_bundle):
    from edgeft.device.generate import GenerateConfig, generate

    prompt = "Station north ridge: pump is worn."
    texts = {
        p: generate(GenerateConfig(llama_bundle, prompt, max_new_tokens=16, provider=p), io.StringIO())
        for p in ("cpu", "cuda")
    }
    assert texts["cuda"] == texts["cpu"]
