"""A bundle loaded for training and evaluation: one ORT training Module, base weights inside.

The bundle ships a *nominal* checkpoint (names and shapes only) plus ``weights.safetensors``;
we fill every parameter in the training graph's input order with one contiguous copy.
"""

from __future__ import annotations

import numpy as np

from edgeft.bundle import Bundle
from edgeft.device.data import Batch
from edgeft.device.ort import session_options, training_api
from edgeft.errors import EdgeftError


class LoraModel:
    """Training and eval graphs of ``bundle`` sharing one set of parameters."""

    def __init__(
        self, bundle: Bundle, lora: dict[str, np.ndarray], threads: int | None = None, provider: str | None = None
    ):
        api = training_api()
        m = bundle.manifest
        self.bundle = bundle
        self.state = api.CheckpointState.load_checkpoint(str(bundle.path(m["checkpoint"])))
        self.module = api.Module(
            str(bundle.path(m["graphs"]["training"]["file"])),
            self.state,
            str(bundle.path(m["graphs"]["eval"]["file"])),
            device=training_device(provider),
            session_options=session_options(threads),
        )
        self._load_parameters(lora)
        self.names = [p["onnx"] for p in bundle.trainable]

    def _load_parameters(self, lora: dict[str, np.ndarray]) -> None:
        from safetensors import safe_open

        params = self.bundle.manifest["parameters"]
        buffer = np.empty(sum(int(np.prod(p["shape"])) for p in params), np.float32)
        offset = 0
        with safe_open(str(self.bundle.path(self.bundle.manifest["weights"])), framework="numpy") as weights:
            for p in params:
                arr = lora[p["onnx"]] if p["trainable"] else weights.get_tensor(p["key"])
                buffer[offset : offset + arr.size] = arr.reshape(-1)
                offset += arr.size
        # The Python wrapper forwards its argument as is: the C++ side wants the raw OrtValue.
        self.module.copy_buffer_to_parameters(_ortvalue(buffer)._ortvalue, False)

    def loss(self, batch: Batch, denominator: float) -> float:
        """Eval-graph loss: sum of token cross-entropies / ``denominator``."""
        self.module.eval()
        return float(self.module(*_inputs(batch, denominator)))

    def forward_backward(self, batch: Batch, denominator: float) -> float:
        """Training-graph step: loss, and its gradients added to the accumulation buffers."""
        self.module.train()
        return float(self.module(*_inputs(batch, denominator)))

    def gradients(self) -> dict[str, np.ndarray]:
        params = self.state.parameters
        return {n: params[n].grad for n in self.names}

    def lora(self) -> dict[str, np.ndarray]:
        params = self.state.parameters
        return {n: params[n].data for n in self.names}

    def set_lora(self, lora: dict[str, np.ndarray]) -> None:
        params = self.state.parameters
        for n in self.names:
            params[n] = np.ascontiguousarray(lora[n], dtype=np.float32)

    def zero_grad(self) -> None:
        self.module.lazy_reset_grad()


def training_device(provider: str | None) -> str:
    """ORT training Module device string for an execution provider name: CUDA or CPU only."""
    if provider in (None, "CPUExecutionProvider", "cpu"):
        return "cpu"
    if provider in ("CUDAExecutionProvider", "cuda"):
        return "cuda"
    raise EdgeftError(f"training runs on the CPU or CUDA execution providers, not {provider}")


def _inputs(batch: Batch, denominator: float):
    return batch.input_ids, batch.attention_mask, batch.labels, np.array(denominator, dtype=np.float32)


def _ortvalue(array: np.ndarray):
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(array)
