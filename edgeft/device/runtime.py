"""A bundle loaded for training and evaluation: one ORT training Module, base weights inside.

The bundle ships a *nominal* checkpoint (names and shapes only) plus ``weights.safetensors``;
we fill every parameter in the training graph's input order with one contiguous copy.
"""

from __future__ import annotations

import numpy as np

from edgeft.bundle import GRAPH_INPUTS, Bundle, read_safetensors_header
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
            session_options=_training_options(threads),
        )
        self._quantized_device = training_device(provider)
        self._quantized = quantized_inputs(bundle, self._quantized_device)  # {} for an fp32 bundle
        self._load_parameters(lora)
        self.names = [p["onnx"] for p in bundle.trainable]

    def _load_parameters(self, lora: dict[str, np.ndarray]) -> None:
        from safetensors import safe_open

        params = [p for p in self.bundle.manifest["parameters"] if "quantized" not in p]
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
        if self._quantized:
            return self._quantized_step("eval", batch, denominator)
        return float(self.module(*_inputs(batch, denominator)))

    def forward_backward(self, batch: Batch, denominator: float) -> float:
        """Training-graph step: loss, and its gradients added to the accumulation buffers."""
        self.module.train()
        if self._quantized:
            return self._quantized_step("training", batch, denominator)
        return float(self.module(*_inputs(batch, denominator)))

    def _quantized_step(self, graph: str, batch: Batch, denominator: float) -> float:
        """A step of a quantized bundle: every input as an OrtValue (Module's OrtValue call path), the
        quantized weights and scales as the OrtValues made once over their file-backed arrays."""
        data = dict(zip(GRAPH_INPUTS, _inputs(batch, denominator), strict=True))
        device = self._quantized_device
        feeds = [
            self._quantized[n] if n in self._quantized else _ortvalue(np.asarray(data[n], order="C"), device)
            for n in self.bundle.manifest["graphs"][graph]["inputs"]
        ]
        return float(self.module(*feeds).numpy())

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


def _training_options(threads: int | None):
    """Session options of the training Module: edgeft's, without ORT's memory pattern. The pattern
    pre-plans one block per input shape; at batch 4 x seq 512 on a 160M-parameter model it raised
    peak RSS by ~1 GB (13 %) for no speed gain, while short sequences are unaffected (measured in
    benchmarks/RESULTS.md). Numerics are unchanged: it only decides where buffers live."""
    opts = session_options(threads)
    opts.enable_mem_pattern = False
    return opts


def _inputs(batch: Batch, denominator: float):
    return batch.input_ids, batch.attention_mask, batch.labels, np.array(denominator, dtype=np.float32)


def _ortvalue(array: np.ndarray, device: str = "cpu"):
    from onnxruntime import OrtValue

    return OrtValue.ortvalue_from_numpy(array, device, 0)


QUANT_SCHEMES = ("int8", "int4")
_ST_DTYPES = {"F32": np.float32, "I8": np.int8, "U8": np.uint8, "F16": np.float16, "I32": np.int32, "I64": np.int64}


def quantized_inputs(bundle: Bundle, device: str = "cpu") -> dict:
    """Graph input name -> OrtValue for each quantized weight's data and scales (``edgeft export
    --quantize``); ``{}`` for an fp32 bundle. The arrays are read-only memory maps of
    weights.safetensors (pages stay file-backed) and the CPU OrtValues wrap them without a copy."""
    m = bundle.manifest
    entries = [p for p in m["parameters"] if "quantized" in p]
    if not entries:
        return {}
    scheme = (m.get("quantization") or {}).get("scheme")
    if scheme not in QUANT_SCHEMES or any(p["quantized"].get("scheme") != scheme for p in entries):
        raise EdgeftError(
            f"{bundle.root}: the base weights are quantized as {scheme!r}, which this edgeft does not support "
            f"({', '.join(QUANT_SCHEMES)}); upgrade edgeft on this device"
        )
    arrays = safetensors_memmap(bundle.path(m["weights"]))
    values = {}
    for p in entries:
        q = p["quantized"]
        for name, key in ((q["data_input"], p["key"]), (q["scales_input"], q["scales_key"])):
            if key not in arrays:
                raise EdgeftError(f"{bundle.path(m['weights'])}: tensor {key} (quantized {p['onnx']}) is missing")
            values[name] = _ortvalue(arrays[key], device)
    values["__arrays__"] = arrays  # keep the maps alive as long as the OrtValues
    return values


def safetensors_memmap(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only ``np.memmap`` (no copy into anonymous memory)."""
    raw, header = read_safetensors_header(path)
    out = {}
    for key, entry in header.items():
        if key == "__metadata__" or entry.get("dtype") not in _ST_DTYPES:
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            out[key] = np.zeros(shape, _ST_DTYPES[entry["dtype"]])
            continue
        out[key] = np.memmap(path, _ST_DTYPES[entry["dtype"]], mode="r", offset=len(raw) + begin, shape=shape)
    return out
