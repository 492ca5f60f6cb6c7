"""Serving core: one ONNX Runtime session over the bundle's KV-cache decoder, many adapters.

LoRA A/B are inputs of ``decoder_lora.onnx``; an adapter is a set of small arrays fed with each
request (on CPU, ORT reads numpy inputs in place), so switching adapters never creates a session
or re-reads base weights. Works with the
plain ``onnxruntime`` package (>= 1.20) as well as the training build.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.errors import EdgeftError

BASE = "base"  # the adapter name that means "no adapter"


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None


def pick_providers(requested: str | None) -> list[str]:
    """Execution providers for a session: ``requested`` if available, else the best available."""
    from edgeft.device.ort import onnxruntime

    available = onnxruntime().get_available_providers()
    if requested:
        name = (
            requested
            if requested.endswith("ExecutionProvider")
            else _PROVIDER_ALIASES.get(requested.lower(), requested)
        )
        if name in available:
            return [name, "CPUExecutionProvider"] if name != "CPUExecutionProvider" else [name]
        print(
            f"edgeft: provider {requested} is not available here ({', '.join(available)}); using CPU", file=sys.stderr
        )
        return ["CPUExecutionProvider"]
    preferred = [p for p in ("CUDAExecutionProvider",) if p in available]
    return [*preferred, "CPUExecutionProvider"]


_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


class Decoder:
    """The bundle's decoder session plus named adapters (``base`` is always there)."""

    sessions_created = 0  # class-wide count, so tests can prove adapter switches create none

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None):
        from edgeft.device.ort import onnxruntime, session_options

        graph = bundle.manifest["graphs"].get("decoder_lora")
        if graph is None:
            raise EdgeftError(f"{bundle.root}: this bundle has no decoder graph; re-export it with this edgeft")
        self.bundle = bundle
        self.config = json.loads(bundle.path("config.json").read_text())
        opts = session_options(threads, deterministic=False)
        self.session = onnxruntime().InferenceSession(
            str(bundle.path(graph["file"])), opts, providers=pick_providers(provider)
        )
        Decoder.sessions_created += 1
        self.lora_inputs = graph["lora_inputs"]
        self.past_names = [n for n in graph["inputs"] if n.startswith("past_key_values.")]
        self.output_names = graph["outputs"]
        self.kv_shape = self._kv_shape()
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self.adapters[BASE] = self._base_lora()

    def _kv_shape(self) -> tuple[int, int]:
        cfg = self.config
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return heads, cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    def _base_lora(self) -> dict[str, np.ndarray]:
        # B = 0 makes every LoRA branch vanish: the base model, with no second session.
        shapes = {p["onnx"]: p["shape"] for p in self.bundle.trainable}
        return {n: np.zeros(shapes[n], np.float32) for n in self.lora_inputs}

    def add_adapter(self, name: str, path: str | Path) -> None:
        from edgeft.device.adapter import load_adapter

        if name == BASE:
            raise EdgeftError(f"adapter name {BASE!r} is reserved for the base model")
        lora = load_adapter(path, self.bundle)
        self.adapters[name] = {n: lora[n] for n in self.lora_inputs}

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list[np.ndarray], adapter: str):
        """One forward pass: returns (logits, present key/values)."""
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update(zip(self.past_names, past, strict=True))
        feeds.update(self.adapters[adapter])
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        heads, dim = self.kv_shape
        return [np.zeros((batch, heads, 0, dim), np.float32) for _ in self.past_names]

    def generate_ids(self, prompt: list[int], adapter: str, sampling: Sampling, stop_ids: set[int]) -> Iterator[int]:
        """Yield new token ids one by one (prefill once, then one token per step with the cache)."""
        if adapter not in self.adapters:
            raise EdgeftError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.adapters)})")
        rng = np.random.default_rng(sampling.seed)
        ids = np.array([prompt], np.int64)
        positions = np.arange(len(prompt), dtype=np.int64)[None]
        past = self.empty_past()
        total = len(prompt)
        for _ in range(sampling.max_new_tokens):
            logits, past = self.step(ids, np.ones((1, total), np.int64), positions, past, adapter)
            token = sample(logits[0, -1], sampling, rng)
            yield token
            if token in stop_ids:
                return
            ids = np.array([[token]], np.int64)
            positions = np.array([[total]], np.int64)
            total += 1


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, top-k, then top-p (nucleus) sampling."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.size:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        cut = order[np.searchsorted(cumulative, sampling.top_p) + 1 :]
        probs[cut] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
