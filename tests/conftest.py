"""Shared fixtures: tiny random models of each supported type, exported once per test session.

The tiny models carry their family's features (edgeft/host/tiny.py FEATURES): llama3 rope scaling,
sliding windows of 16 tokens (mistral, qwen2's upper layer, gemma3's local layers), phi3 longrope
switching at 32 tokens with partial rotary, qwen3 q/k norms and yarn, gemma3's norms and scalars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
MODEL_TYPES = ["llama", "mistral", "qwen2", "phi3", "qwen3", "gemma3_text"]

os.environ.setdefault("OMP_NUM_THREADS", "2")


class _Factory:
    """Builds tiny models and bundles on first use and caches them for the session."""

    def __init__(self, root: Path):
        self.root = root
        self.cache: dict = {}

    def model(self, model_type: str) -> Path:
        key = ("model", model_type)
        if key not in self.cache:
            from edgeft.host.tiny import make_tiny_model

            self.cache[key] = make_tiny_model(model_type, self.root / f"model-{model_type}", size="tiny", features=True)
        return self.cache[key]

    def bundle(self, model_type: str, **options) -> Path:
        key = ("bundle", model_type, tuple(sorted((k, str(v)) for k, v in options.items())))
        if key not in self.cache:
            from edgeft.host.export import ExportConfig, export_bundle

            out = self.root / f"bundle-{model_type}-{len(self.cache)}"
            options.setdefault("max_seq_len", 128)
            self.cache[key] = export_bundle(ExportConfig(self.model(model_type), out, **options))
        return self.cache[key]


@pytest.fixture(scope="session")
def factory(tmp_path_factory) -> _Factory:
    # The host stack builds every model and bundle: without it `make test` must fail, not turn
    # into a green run of skips.
    try:
        import torch  # noqa: F401
    except ImportError as e:
        problem = str(e)
    else:
        return _Factory(tmp_path_factory.mktemp("tiny"))
    pytest.fail(f"the host venv cannot import torch ({problem}); run `make venv` (the tests need it)", pytrace=False)


@pytest.fixture(scope="session")
def llama_bundle(factory) -> Path:
    return factory.bundle("llama")
