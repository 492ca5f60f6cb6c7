"""Memory planner: peak RSS of training and of serving a bundle, before running either.

The estimate is structural (weights, LoRA and optimizer state, activations, KV cache) with
coefficients measured on plain onnxruntime 1.32, CPU, fp32, with edgeft's training session
options: training runs over six model shapes (llama, qwen2 with tied embeddings, phi3; 27-364
MB of weights, vocab 512-32064, batch 1-4, sequence 128-1024; 36 runs) fell within ±9 % of the
fitted formula but one (+11 %: phi3 with a 32064 vocabulary at batch 1 x 128, whose embedding
rows are mostly never read, so never resident); the same 36 with layer recomputation within ±9 %
but that one (+13 %); 6 serving runs within ±16 %.
The interpreter and runtime libraries are measured, not assumed: the planner reads its own
resident memory after importing the runtime that will run the job.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft.bundle import Bundle
from edgeft.models import MODEL_TABLE
from edgeft.tasks import Task

MB = 1 << 20
F32 = 4

# Training (LoraGraphs: training + eval sessions over one mapping of the weights; module docstring).
TRAIN_OVERHEAD_MB = 19.9  # two sessions, kernels, arena slack
TRAIN_PER_LAYER_TOKEN = 6.00  # x T * layers * (hidden + intermediate) floats saved for backward
TRAIN_ATTENTION = 1.36  # x batch * layers * heads * seq^2 floats (scores, softmax, grads)
TRAIN_VOCAB = 4.12  # x T * vocab floats (logits etc.; exist for labelled rows only: T is the upper bound)
# With layer recomputation (same 30 runs): each layer's input kept, one layer's activations at a time.
RECOMPUTE_OVERHEAD_MB = 20.3
RECOMPUTE_KEPT = 1.0  # x T * layers * hidden floats: each layer's input (fixed, not fitted)
RECOMPUTE_LAYER_TOKEN = 12.31  # x T * (hidden + intermediate) floats: one layer's forward + backward
RECOMPUTE_ATTENTION = 2.50  # x batch * heads * seq^2 floats: that layer's scores, probabilities, grads
RECOMPUTE_VOCAB = 3.35
QUANT_DEQUANT_COPIES = 2.0  # x (largest layer + lm_head) float32 weights, quantized bundles only
# Serving (decoder session): transposed copies of linear weights are folded at session start.
SERVE_OVERHEAD_MB = 19.0
SERVE_LINEAR_COPY = 0.4
SERVE_PREFILL_VOCAB, SERVE_PREFILL_ATTENTION, SERVE_PREFILL_LAYER = 1.5, 2.0, 4.0
SERVE_KV_COPIES = 2  # the cache fed in and the grown cache coming out


@dataclass
class Plan:
    train_peak_mb: float
    train_recompute_peak_mb: float  # with layer recomputation (export --recompute auto|layers)
    serve_peak_mb: float
    runtime_mb: float
    weights_mb: float
    lora_state_mb: float
    train_activations_mb: float
    train_recompute_activations_mb: float
    kv_cache_mb: float
    batch_size: int
    max_seq_len: int

    def as_dict(self) -> dict:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    activation_factor: float  # per model type, edgeft/models.py
    recompute_factor: float

    @classmethod
    def of(cls, bundle: Bundle) -> _Shape:
        c = json.loads(bundle.path("config.json").read_text())
        heads = c["num_attention_heads"]
        facts = MODEL_TABLE.get(c.get("model_type"))
        labels = Task.of(bundle.manifest).labels  # a classifier's logits are this wide, not the vocabulary
        return cls(
            c["hidden_size"],
            c.get("intermediate_size", 4 * c["hidden_size"]),
            c["num_hidden_layers"],
            heads,
            c.get("num_key_value_heads") or heads,
            c.get("head_dim") or c["hidden_size"] // heads,
            len(labels) if labels else c["vocab_size"],
            facts.train_activation_factor if facts else 1.0,
            facts.recompute_activation_factor if facts else 1.0,
        )


def plan(bundle: Bundle, batch_size: int = 4, max_seq_len: int | None = None, runtime_mb: float | None = None) -> Plan:
    """Estimate peak RSS (MB) of ``edgeft train`` at this batch/sequence and of serving one request
    of ``max_seq_len`` tokens (prompt + completion)."""
    seq = bundle.seq_len(max_seq_len)
    shape = _Shape.of(bundle)
    weights = sum(math.prod(p["shape"]) for p in bundle.frozen) * F32 / MB
    fp32_weights = weights
    quant = bundle.manifest.get("quantization")
    if quant:  # export --quantize: stored (and mapped) quantized; SPEC section 3c
        weights = _quantized_weights_mb(bundle, quant)
    embed = _embedding_mb(bundle)
    lora = bundle.manifest["lora"]["trainable_parameters"] * F32 / MB
    base = runtime_baseline_mb() if runtime_mb is None else runtime_mb
    act = _train_activations_mb(shape, batch_size, seq)
    act_rc = _recompute_activations_mb(shape, batch_size, seq)
    if quant and quant.get("compute", "dequant") == "dequant":  # float32 copies alive during a step
        dequant = QUANT_DEQUANT_COPIES * _largest_dequantized_mb(bundle)
        act, act_rc = act + dequant, act_rc + dequant
    lora_state = 6 * lora  # params, gradient outputs, their sum, 2 AdamW moments, update temporaries
    # The weights are mapped once (file-backed pages, resident once read) and shared by both sessions.
    train_peak = base + TRAIN_OVERHEAD_MB + weights + lora_state + act
    train_recompute_peak = base + RECOMPUTE_OVERHEAD_MB + weights + lora_state + act_rc
    kv = SERVE_KV_COPIES * 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * F32 / MB
    if Task.of(bundle.manifest).is_classification:  # served by the eval graph: one forward, no KV cache
        kv = 0.0
    serve_load = base + SERVE_OVERHEAD_MB + weights + SERVE_LINEAR_COPY * (weights - embed)
    if quant and quant.get("scheme") == "int8":  # the decoder session folds int8 weights to float32
        serve_load = base + SERVE_OVERHEAD_MB + weights + (1 + SERVE_LINEAR_COPY) * (fp32_weights - embed)
    serve = serve_load + max(_prefill_mb(shape, seq), kv)
    return Plan(train_peak, train_recompute_peak, serve, base, weights, lora_state, act, act_rc, kv, batch_size, seq)


def _train_activations_mb(s: _Shape, batch: int, seq: int) -> float:
    tokens = batch * seq
    floats = (
        TRAIN_PER_LAYER_TOKEN * s.activation_factor * tokens * s.layers * (s.hidden + s.intermediate)
        + TRAIN_ATTENTION * batch * s.layers * s.heads * seq * seq
        + TRAIN_VOCAB * tokens * s.vocab
    )
    return floats * F32 / MB


def _recompute_activations_mb(s: _Shape, batch: int, seq: int) -> float:
    """With layer recomputation: every layer's input is kept; one layer's activations (and its
    backward) are alive at a time; the head's term is unchanged."""
    tokens = batch * seq
    floats = (
        RECOMPUTE_KEPT * tokens * s.layers * s.hidden
        + RECOMPUTE_LAYER_TOKEN * s.recompute_factor * tokens * (s.hidden + s.intermediate)
        + RECOMPUTE_ATTENTION * batch * s.heads * seq * seq
        + RECOMPUTE_VOCAB * tokens * s.vocab
    )
    return floats * F32 / MB


def _prefill_mb(s: _Shape, prompt: int) -> float:
    floats = (
        SERVE_PREFILL_VOCAB * s.vocab  # decoder_lora.onnx computes the last position's logits only
        + SERVE_PREFILL_ATTENTION * s.heads * prompt * prompt
        + SERVE_PREFILL_LAYER * prompt * (s.hidden + s.intermediate)
    )
    return floats * F32 / MB


def _quantized_weights_mb(bundle: Bundle, quant: dict) -> float:
    """Bytes of the frozen weights of a quantized bundle: float32 ones plus quantized data + scales."""
    total = 0.0
    block = quant.get("block_size") or 32
    for p in bundle.frozen:
        n = math.prod(p["shape"])
        if "quantized" not in p:
            total += n * F32
        elif quant.get("scheme") == "int8":
            total += n + p["shape"][0] * F32
        else:
            rows, cols = p["shape"][0], math.prod(p["shape"][1:])
            blocks = math.ceil(cols / block)
            total += rows * blocks * (block // 2 + F32)
    return total / MB


def _largest_dequantized_mb(bundle: Bundle) -> float:
    """float32 size of the biggest decoder layer's quantized weights plus the output head's."""
    layers: dict[str, int] = {}
    head = 0
    for p in bundle.frozen:
        if "quantized" not in p:
            continue
        n = math.prod(p["shape"])
        layer = p["key"].split(".layers.", 1)[1].split(".", 1)[0] if ".layers." in p["key"] else None
        if layer is not None:
            layers[layer] = layers.get(layer, 0) + n
        elif "embed" not in p["key"]:
            head += n
    return (max(layers.values(), default=0) + head) * F32 / MB


def _embedding_mb(bundle: Bundle) -> float:
    # Embedding tables are gathered, not multiplied: no transposed copy is folded for them.
    return sum(math.prod(p["shape"]) for p in bundle.frozen if "embed" in p["key"]) * F32 / MB


def runtime_baseline_mb() -> float:
    """Resident memory of this process once the runtime libraries are imported (MB)."""
    import numpy  # noqa: F401
    import tokenizers  # noqa: F401

    from edgeft.device.session import onnxruntime

    onnxruntime()
    return current_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB). On Linux VmHWM, which starts afresh at exec;
    getrusage's ru_maxrss would include a large parent's memory at fork time."""
    return _proc_status_mb("VmHWM")


def available_memory_mb() -> float | None:
    """MemAvailable (Linux), capped by a cgroup memory limit if one is set; None elsewhere."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    available = int(fields["MemAvailable"].split()[0]) / 1024
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.is_file() and limit.read_text().strip().isdigit():
        available = min(available, int(limit.read_text()) / MB - current_rss_mb())
    return available


def current_rss_mb() -> float:
    """Resident memory now (MB): VmRSS on Linux."""
    return _proc_status_mb("VmRSS")


def _proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB; elsewhere the peak from getrusage."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
