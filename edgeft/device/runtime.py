"""The bundle's training and eval graphs on plain onnxruntime: loss, and loss + LoRA gradients.

Both are ordinary inference graphs (format 2): inputs are the batch, ``num_loss_tokens`` and the
trainable tensors; the frozen weights are external data in ``weights.safetensors``. There is no
hidden parameter state: the caller owns the LoRA dict (updated in place by AdamW), sums
micro-batch gradients and steps the optimizer — mlx-lm's split of value_and_grad and update.

Both sessions read the frozen weights from one read-only mapping of weights.safetensors
(``edgeft.device.weights``). Each session runs through one IOBinding: on CPU the LoRA OrtValues wrap
the caller's numpy arrays and the gradient outputs are bound to preallocated numpy arrays, so
neither is copied per step.
"""

from __future__ import annotations

import contextlib
from functools import cached_property

import numpy as np

from edgeft.bundle import GRAPH_INPUTS, Bundle
from edgeft.device.data import Batch
from edgeft.device.session import SessionConfig, onnxruntime, open_session
from edgeft.device.weights import BundleWeights
from edgeft.errors import EdgeftError

PREPACKING = "session.disable_prepacking"  # onnxruntime's session config key: "0" pre-packs


def graph_session(provider: str | None = None, threads: int | None = None, prepack: bool = False) -> SessionConfig:
    """Session options of the training and eval graphs, all for memory (numerics unchanged).
    Measured on a 364 MB llama-shaped bundle, batch 1 (benchmarks/RESULTS.md has the grid):
    - no constant folding: it would fold Transpose(W) and the dequantization of quantized weights
      into new float32 copies of every weight (+390 MB);
    - no pre-packing: MLAS would keep packed copies of float weights for the forward and the
      backward (+480 MB); ``prepack`` turns it on for int4 bundles (edgeft train --prepack), whose
      MatMulNBits calls without it dequantize the whole weight to float32 each, and whose packed
      layout then replaces the mapped pages (``_Bound`` drops them);
    - no planned buffer reuse: onnxruntime hands a freed activation's buffer to a later tensor,
      which keeps it alive as long as that tensor lives; across the backward this held 1.3-4x the
      live activations (seq 1024: 1815 -> 1448 MB, and with layer recomputation 1552 -> 435 MB);
    - no common-subexpression elimination: it would merge layer recomputation back into the
      forward (edgeft/host/recompute.py);
    - no memory pattern: it pre-plans one block per input shape (+1 GB at batch 4 x seq 512 on a
      160M-parameter model, no speed gain)."""
    return SessionConfig(
        provider=provider,
        threads=threads,
        mem_pattern=False,
        mem_reuse=False,
        disabled_optimizers=["ConstantFolding", "CommonSubexpressionElimination"],
        config_entries={PREPACKING: "0" if prepack else "1"},
    )


def packs_int4(bundle: Bundle) -> bool:
    """Whether the bundle's training graphs multiply with int4 MatMulNBits (export --quantize int4,
    --quant-compute fp32 or int8), which pre-packing speeds up."""
    quant = bundle.manifest.get("quantization") or {}
    return quant.get("scheme") == "int4" and quant.get("compute", "dequant") != "dequant"


def training_variants(bundle: Bundle) -> dict[bool, str]:
    """{recompute: manifest graph name} of the bundle's training graphs (export --recompute)."""
    graphs = bundle.manifest["graphs"]
    return {bool(graphs[name].get("recompute")): name for name in ("training", "training_recompute") if name in graphs}


class LoraGraphs:
    """``loss(lora, batch, denominator)`` and ``loss_and_grads(lora, batch, denominator)``."""

    def __init__(self, bundle: Bundle, session: SessionConfig | None = None, recompute: bool = False):
        self.bundle = bundle
        self.config = session or graph_session()
        self.training_graph = training_variants(bundle).get(recompute)
        if self.training_graph is None:
            kind = "with" if recompute else "without"
            raise EdgeftError(f"{bundle.root}: this bundle has no training graph {kind} layer recomputation")
        self.weights = BundleWeights(bundle)  # one mapping shared by both sessions
        self.names = [p["onnx"] for p in bundle.trainable]
        self._gradients = bundle.manifest["graphs"][self.training_graph]["gradients"]

    @cached_property
    def _training(self) -> _Bound:
        return _Bound(self.bundle, self.training_graph, self.config, self.weights)

    @cached_property
    def _eval(self) -> _Bound:
        return _Bound(self.bundle, "eval", self.config, self.weights)

    def loss(self, lora: dict[str, np.ndarray], batch: Batch, denominator: float) -> float:
        """Sum of the batch's token cross-entropies / ``denominator`` (eval graph: no dropout)."""
        return self._eval.run(lora, batch, denominator, {})

    def loss_and_logits(
        self, lora: dict[str, np.ndarray], batch: Batch, denominator: float, num_labels: int
    ) -> tuple[float, np.ndarray]:
        """A classification bundle's eval graph: the loss and a copy of the logits, shaped like
        ``batch.labels`` plus ``num_labels`` ([batch, labels] or [batch, seq, labels])."""
        shape = (*batch.labels.shape, num_labels)
        loss = self._eval.run(lora, batch, denominator, {"logits": shape})
        return loss, self._eval.outputs["logits"].copy()

    def loss_and_grads(
        self, lora: dict[str, np.ndarray], batch: Batch, denominator: float
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and its gradient for every trainable tensor (arrays reused by the next call: copy
        or sum them before calling again)."""
        outputs = {self._gradients[n]: shape for n, shape in self._training.shapes.items()}
        loss = self._training.run(lora, batch, denominator, outputs)
        return loss, {n: self._training.outputs[self._gradients[n]] for n in self.names}


class _Bound:
    """One session with its IOBinding, LoRA OrtValues and preallocated outputs."""

    def __init__(self, bundle: Bundle, graph: str, config: SessionConfig, weights: BundleWeights):
        entry = bundle.manifest["graphs"][graph]
        shared = weights.values if config.provider in (None, "cpu", "CPUExecutionProvider") else None
        # Pre-packing reads every int4 weight once into MLAS's own layout: drop the mapped pages as
        # it goes, so that layout replaces the stored one in memory (edgeft/device/weights.py).
        packs = shared is not None and config.config_entries.get(PREPACKING) == "0"
        with weights.shedding() if packs else contextlib.nullcontext():
            self.session = open_session(bundle.path(entry["file"]), config, shared)
        self.binding = self.session.io_binding()
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.inputs = entry["inputs"]
        self.shapes = {p["onnx"]: tuple(p["shape"]) for p in bundle.trainable}
        self.outputs: dict[str, np.ndarray] = {}
        self._lora: dict[str, tuple[np.ndarray, object]] = {}  # name -> (array, OrtValue bound)

    def run(self, lora: dict[str, np.ndarray], batch: Batch, denominator: float, extra: dict[str, tuple]) -> float:
        """Run with ``extra`` outputs ({name: shape}) besides the loss; results land in ``outputs``."""
        data = dict(zip(GRAPH_INPUTS, _batch_arrays(batch, denominator), strict=True))
        for name in self.inputs:
            if name in data:
                self.binding.bind_cpu_input(name, data[name])
            else:
                self._bind_lora(name, lora[name])
        wanted = {"loss": (), **extra}
        for name, shape in wanted.items():
            self._bind_output(name, shape)
        self.session.run_with_iobinding(self.binding)
        if self.device != "cpu":  # outputs were written on the device: fetch them into our arrays
            for name, value in zip(wanted, self.binding.get_outputs(), strict=True):
                np.copyto(self.outputs[name], value.numpy())
        return float(self.outputs["loss"])

    def _bind_lora(self, name: str, array: np.ndarray) -> None:
        bound = self._lora.get(name)
        if bound is not None and bound[0] is array:
            if self.device != "cpu":
                bound[1].update_inplace(array)  # AdamW changed the host copy
            return
        array = np.ascontiguousarray(array, dtype=np.float32)
        value = onnxruntime().OrtValue.ortvalue_from_numpy(array, self.device, 0)  # CPU: wraps, no copy
        self.binding.bind_ortvalue_input(name, value)
        self._lora[name] = (array, value)

    def _bind_output(self, name: str, shape: tuple) -> None:
        current = self.outputs.get(name)
        if current is None or current.shape != tuple(shape):  # logits: a new shape per batch
            self.outputs[name] = np.zeros(shape, np.float32)
            if self.device == "cpu":  # ORT writes straight into our array, every run
                value = onnxruntime().OrtValue.ortvalue_from_numpy(self.outputs[name])
                self.binding.bind_ortvalue_output(name, value)
        if self.device != "cpu":
            self.binding.bind_output(name, self.device)


def _batch_arrays(batch: Batch, denominator: float):
    return batch.input_ids, batch.attention_mask, batch.labels, np.array(denominator, dtype=np.float32)
