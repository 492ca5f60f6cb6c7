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

``plan_model`` plans before any export, from a Hugging Face ``config.json`` alone: the same
formulas over the shapes the config implies, for each precision (fp32, int8, int4) and recompute
setting, against a device's memory budget. There the runtime is the device's, not this process's
(DEVICE_RUNTIME_MB).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgeft.bundle import Bundle, loss_chunk_rows
from edgeft.errors import EdgeftError
from edgeft.models import MODEL_TABLE, model_facts
from edgeft.tasks import Task

MB = 1 << 20
F32 = 4

# Training (LoraGraphs: training + eval sessions over one mapping of the weights; module docstring).
TRAIN_OVERHEAD_MB = 19.9  # two sessions, kernels, arena slack
TRAIN_PER_LAYER_TOKEN = 6.00  # x T * layers * (hidden + intermediate) floats saved for backward
# x batch * layers * heads * seq^2 floats: every layer's probabilities kept (bundles before
# recompute_attention). Since, one layer's at a time: RECOMPUTE_ATTENTION's term (measured, 8 layers,
# 768 wide, batch 4 x 1024: 7837 MB kept, 5773 MB recomputed).
TRAIN_ATTENTION = 1.36
TRAIN_VOCAB = 4.12  # x T * vocab floats (logits etc.; exist for labelled rows only: T is the upper bound)
# A chunked loss head (manifest loss_chunk_rows) holds one chunk's rows: T becomes min(T, rows) in both
# vocab terms. Checked (vocab 128256 / 151936 / 32064 shapes, batch 1-4, seq 256-1024, both graphs):
# planned -7 % to +25 % of measured; the worst (+22-25 %) at seq 1024 and where few embedding rows are read.
# With layer recomputation (same 30 runs): each layer's input kept, one layer's activations at a time.
RECOMPUTE_OVERHEAD_MB = 20.3
RECOMPUTE_KEPT = 1.0  # x T * layers * hidden floats: each layer's input (fixed, not fitted)
RECOMPUTE_LAYER_TOKEN = 12.31  # x T * (hidden + intermediate) floats: one layer's forward + backward
RECOMPUTE_ATTENTION = 2.50  # x batch * heads * seq^2 floats: that layer's scores, probabilities, grads
RECOMPUTE_VOCAB = 3.35
# int4 MatMulNBits training (--quant-compute fp32|int8). Unpacked (edgeft train --prepack off), every
# call dequantizes its whole weight to float32: a temporary the size of the largest one, K x N floats
# (Llama-3.2-1B's tied 128256 x 2048 head: 1002 MB). Pre-packed, that temporary goes: MLAS repacks the
# 4-bit data (the same bytes; the mapped pages are dropped as it goes) and reads the scales from the
# mapping; with int8 compute its layout adds int8 block sums. Measured at session start, Llama-3.2-1B
# int4: 0.50 bytes per weight element with fp32 compute (the data), 0.75 with int8.
PREPACK_EXTRA = {"fp32": 0.0, "int8": 0.25}  # bytes per element of the int4 layouts beyond the stored data
QUANT_DEQUANT_COPIES = 2.0  # x (largest layer + lm_head) float32 weights, quantized bundles only
# Serving (decoder session): transposed copies of linear weights are folded at session start.
SERVE_OVERHEAD_MB = 19.0
SERVE_LINEAR_COPY = 0.3  # 0.4 before the GroupQueryAttention decoder: small phi3 planned 96 MB, measured 78-84
SERVE_PREFILL_VOCAB, SERVE_PREFILL_ATTENTION, SERVE_PREFILL_LAYER = 1.5, 2.0, 4.0
SERVE_KV_COPIES = 2  # the cache fed in and the grown cache coming out
SERVE_KV_COPIES_SHARED = 1  # GroupQueryAttention (kv_cache: shared): one preallocated buffer
# Planning for another machine: Python + numpy + tokenizers + onnxruntime imported, measured in the
# torch-free device venv (x86_64 Linux: 54 MB with onnxruntime 1.32, 44 MB with 1.20).
DEVICE_RUNTIME_MB = 54.0
PRECISIONS = ("fp32", "int8", "int4", "int4-dequant")
# What each precision is exported with. int4-dequant: no Wᵀ layout; training dequantizes per layer.
EXPORT_FLAGS = {
    "fp32": "",
    "int8": " --quantize int8",
    "int4": " --quantize int4",
    "int4-dequant": " --quantize int4 --quant-compute dequant",
}
RECOMPUTE = ("none", "layers")


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
    # more (less if negative) with pre-packed int4 weights (edgeft train --prepack): MLAS's layouts
    # instead of the unpacked calls' float32 temporary, which the training peaks include
    train_prepack_mb: float = 0.0

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
    vocab: int  # width of the logits: the vocabulary, or a classifier's number of labels
    activation_factor: float  # per model type, edgeft/models.py
    recompute_factor: float
    attention_kept: bool = False  # the plain training graph keeps every layer's probabilities (older bundles)
    loss_rows: int = 0  # labelled rows per chunk of the loss head (0: all at once, older bundles)

    @classmethod
    def of(cls, bundle: Bundle) -> _Shape:
        labels = Task.of(bundle.manifest).labels
        shape = cls.from_config(json.loads(bundle.path("config.json").read_text()), len(labels) if labels else None)
        training = bundle.manifest["graphs"].get("training", {})
        kept = not training.get("recompute_attention", False)
        return replace(shape, attention_kept=kept, loss_rows=training.get("loss_chunk_rows", 0))

    @classmethod
    def from_config(cls, c: dict, logits: int | None = None) -> _Shape:
        heads = c["num_attention_heads"]
        facts = MODEL_TABLE.get(c.get("model_type"))
        return cls(
            c["hidden_size"],
            c.get("intermediate_size", 4 * c["hidden_size"]),
            c["num_hidden_layers"],
            heads,
            c.get("num_key_value_heads") or heads,
            c.get("head_dim") or c["hidden_size"] // heads,
            logits or c["vocab_size"],
            facts.train_activation_factor if facts else 1.0,
            facts.recompute_activation_factor if facts else 1.0,
            loss_rows=0 if logits else loss_chunk_rows(c["vocab_size"]),  # what export makes by default
        )


@dataclass(frozen=True)
class _Weights:
    """The frozen weights as the sessions hold them (MB)."""

    stored: float  # mapped from weights.safetensors: float32, or quantized data + scales
    fp32: float  # the same weights in float32
    embedding: float  # float32 embedding tables (gathered: no transposed copy is folded)
    scheme: str | None  # None, "int8", "int4"
    dequantized: float = 0.0  # float32 copies a dequantizing training graph keeps alive (MB)
    transposed: float = 0.0  # int4 Wᵀ layouts (training's backward only; the decoders never read them)
    packed: float = 0.0  # what MLAS's layouts of the int4 weights add to the stored ones (MB)
    unpacked: float = 0.0  # the float32 temporary of an unpacked MatMulNBits call: the largest weight (MB)


def plan(bundle: Bundle, batch_size: int = 4, max_seq_len: int | None = None, runtime_mb: float | None = None) -> Plan:
    """Estimate peak RSS (MB) of ``edgeft train`` at this batch/sequence (with and without layer
    recomputation) and of serving one request of ``max_seq_len`` tokens (prompt + completion)."""
    seq = bundle.seq_len(max_seq_len)
    fp32 = sum(math.prod(p["shape"]) for p in bundle.frozen) * F32 / MB
    quant = bundle.manifest.get("quantization")
    # export --quantize: stored (and mapped) quantized; SPEC section 3c
    stored = _quantized_weights_mb(bundle, quant) if quant else fp32
    transposed = _quantized_weights_mb(bundle, quant, transposed_only=True) if quant else 0.0
    dequantized = 0.0
    if quant and quant.get("compute", "dequant") == "dequant":
        dequantized = QUANT_DEQUANT_COPIES * _largest_dequantized_mb(bundle)
    scheme = quant.get("scheme") if quant else None
    elements, largest = _matmul_nbits(bundle)
    nbits = bool(quant) and quant.get("compute") in PREPACK_EXTRA
    packed = PREPACK_EXTRA[quant["compute"]] * elements / MB if nbits else 0.0
    unpacked = largest * F32 / MB if nbits else 0.0
    weights = _Weights(stored, fp32, _embedding_mb(bundle), scheme, dequantized, transposed, packed, unpacked)
    base = runtime_baseline_mb() if runtime_mb is None else runtime_mb
    lora = bundle.manifest["lora"]["trainable_parameters"]
    classifier = Task.of(bundle.manifest).is_classification
    shared = serving_kv_shared(bundle.manifest.get("graphs", {}))
    return _estimate(_Shape.of(bundle), weights, lora, batch_size, seq, base, classifier, shared)


def serving_kv_shared(graphs: dict) -> bool:
    """Whether this device serves the bundle from one preallocated KV cache (SPEC section 3b)."""
    if "decoder_lora" not in graphs:
        return False
    from edgeft.device.decoder import serving_graph
    from edgeft.device.session import onnxruntime

    return serving_graph(graphs, onnxruntime().__version__).get("kv_cache") == "shared"


def _estimate(
    shape: _Shape, w: _Weights, lora_params: int, batch: int, seq: int, base: float, classifier=False, shared_kv=False
):
    lora_state = 6 * lora_params * F32 / MB  # params, gradient outputs, their sum, 2 AdamW moments, update temporaries
    act = _train_activations_mb(shape, batch, seq) + w.dequantized
    act_rc = _recompute_activations_mb(shape, batch, seq) + w.dequantized
    # The weights are mapped once (file-backed pages, resident once read) and shared by both sessions.
    train_peak = base + TRAIN_OVERHEAD_MB + w.stored + w.unpacked + lora_state + act
    train_recompute_peak = base + RECOMPUTE_OVERHEAD_MB + w.stored + w.unpacked + lora_state + act_rc
    copies = SERVE_KV_COPIES_SHARED if shared_kv else SERVE_KV_COPIES
    kv = 0.0 if classifier else copies * 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * F32 / MB
    serve_load = base + SERVE_OVERHEAD_MB + w.stored + SERVE_LINEAR_COPY * (w.stored - w.embedding)
    if w.scheme == "int4":  # MatMulNBits reads the stored W layout as is: no folded copy, no Wᵀ read
        serve_load = base + SERVE_OVERHEAD_MB + w.stored - w.transposed
    if w.scheme == "int8":  # the decoder session folds int8 weights to float32
        serve_load = base + SERVE_OVERHEAD_MB + w.stored + (1 + SERVE_LINEAR_COPY) * (w.fp32 - w.embedding)
    serve = serve_load + max(_prefill_mb(shape, seq), kv)
    return Plan(
        train_peak,
        train_recompute_peak,
        serve,
        base,
        w.stored,
        lora_state,
        act,
        act_rc,
        kv,
        batch,
        seq,
        w.packed - w.unpacked,
    )


def _train_activations_mb(s: _Shape, batch: int, seq: int) -> float:
    tokens = batch * seq
    floats = (
        TRAIN_PER_LAYER_TOKEN * s.activation_factor * tokens * s.layers * (s.hidden + s.intermediate)
        + (TRAIN_ATTENTION * s.layers if s.attention_kept else RECOMPUTE_ATTENTION) * batch * s.heads * seq * seq
        + TRAIN_VOCAB * _loss_rows(s, tokens) * s.vocab
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
        + RECOMPUTE_VOCAB * _loss_rows(s, tokens) * s.vocab
    )
    return floats * F32 / MB


def _loss_rows(s: _Shape, tokens: int) -> int:
    """Rows of vocabulary-wide tensors alive at once: one chunk's in a chunked loss head."""
    return min(tokens, s.loss_rows) if s.loss_rows else tokens


def _prefill_mb(s: _Shape, prompt: int) -> float:
    floats = (
        SERVE_PREFILL_VOCAB * s.vocab  # decoder_lora.onnx computes the last position's logits only
        + SERVE_PREFILL_ATTENTION * s.heads * prompt * prompt
        + SERVE_PREFILL_LAYER * prompt * (s.hidden + s.intermediate)
    )
    return floats * F32 / MB


def _quantized_weights_mb(bundle: Bundle, quant: dict, transposed_only: bool = False) -> float:
    """MB of the frozen weights of a quantized bundle: float32 ones plus quantized data + scales
    (and, for int4 low-precision training, the second layout of each Wᵀ; only those with
    ``transposed_only``)."""
    total = 0.0
    block = quant.get("block_size") or 32
    for p in bundle.frozen:
        kind = "vector" if "quantized" not in p else "embedding" if "embed" in p["key"] else "linear"
        rows, cols = p["shape"][0], math.prod(p["shape"][1:])
        if not transposed_only:
            total += _stored_bytes(kind, rows, cols, quant.get("scheme") if kind != "vector" else None, block)
        if "transposed" in p.get("quantized", {}):
            total += _stored_bytes(kind, cols, rows, "int4", block)
    return total / MB


def _matmul_nbits(bundle: Bundle) -> tuple[int, int]:
    """(elements of every int4 layout the training graphs multiply with through MatMulNBits, W and
    Wᵀ of each weight stored with a Wᵀ layout; elements of the largest such weight)."""
    sizes = [math.prod(p["shape"]) for p in bundle.frozen if "transposed" in p.get("quantized", {})]
    return 2 * sum(sizes), max(sizes, default=0)


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


# --- planning before export: a Hugging Face config.json -------------------------------------------


@dataclass
class ModelPlan:
    precision: str  # fp32 | int8 | int4 | int4-dequant (EXPORT_FLAGS)
    recompute: str  # none | layers
    plan: Plan
    budget_mb: float | None

    @property
    def train_peak_mb(self) -> float:
        return self.plan.train_recompute_peak_mb if self.recompute == "layers" else self.plan.train_peak_mb

    @property
    def fits(self) -> bool | None:
        if self.budget_mb is None:
            return None
        return max(self.train_peak_mb, self.plan.serve_peak_mb) <= self.budget_mb

    def as_dict(self) -> dict:
        plan = self.plan.as_dict()
        plan["train_peak_mb"] = round(self.train_peak_mb, 1)
        for key in ("train_recompute_peak_mb", "train_recompute_activations_mb"):
            plan.pop(key)
        if self.recompute == "layers":
            plan["train_activations_mb"] = round(self.plan.train_recompute_activations_mb, 1)
        return {"precision": self.precision, "recompute": self.recompute, "fits": self.fits, **plan}


def read_model_config(model_dir: Path) -> dict:
    """A Hugging Face model directory's config.json, checked enough to plan from."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeftError(f"{path}: not found (plan takes a bundle or a Hugging Face model directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{path}: invalid JSON ({e})") from None
    model_facts(config.get("model_type"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise EdgeftError(f"{path}: field '{key}' must be a positive integer")
    return config


def plan_model(
    config: dict,
    batch_size: int,
    seq: int,
    budget_mb: float | None,
    lora_r: int = 8,
    block_size: int = 32,
    runtime_mb: float = DEVICE_RUNTIME_MB,
) -> list[ModelPlan]:
    """Every precision x recompute setting for the model of ``config`` (default LoRA targets at
    rank ``lora_r``), with whether its training and serving peaks fit ``budget_mb``."""
    shape = _Shape.from_config(config)
    tensors = _frozen_shapes(config, shape)
    fp32 = sum(rows * cols for _, rows, cols in tensors) * F32 / MB
    embedding = sum(rows * cols for kind, rows, cols in tensors if kind == "embedding") * F32 / MB
    lora = _lora_parameters(config, shape, lora_r)
    tied = config.get("tie_word_embeddings", model_facts(config["model_type"]).tied_default)
    # what int4 training multiplies with through MatMulNBits: the linear weights and a tied head
    matmuls = [(rows, cols) for kind, rows, cols in tensors if kind == "linear" or kind == "embedding" and tied]
    out = []
    for precision in PRECISIONS:
        scheme = None if precision == "fp32" else precision.split("-")[0]
        stored = sum(_stored_bytes(kind, rows, cols, scheme, block_size) for kind, rows, cols in tensors)
        transposed = 0.0
        # --quant-compute fp32 (the default): MatMulNBits over W and a stored Wᵀ, pre-packed by
        # edgeft train's default (--prepack auto): no unpacked call's float32 temporary
        if precision == "int4":
            transposed = sum(_stored_bytes("linear", cols, rows, scheme, block_size) for rows, cols in matmuls)
        dequantizes = precision in ("int8", "int4-dequant")
        dequantized = QUANT_DEQUANT_COPIES * _largest_layer_mb(tensors, shape) if dequantizes else 0.0
        weights = _Weights((stored + transposed) / MB, fp32, embedding, scheme, dequantized, transposed / MB)
        # export writes the GroupQueryAttention decoder (one KV buffer) where head sizes allow it
        estimate = _estimate(shape, weights, lora, batch_size, seq, runtime_mb, shared_kv=shape.head_dim % 8 == 0)
        out.extend(ModelPlan(precision, recompute, estimate, budget_mb) for recompute in RECOMPUTE)
    return out


def _largest_layer_mb(tensors: list[tuple[str, int, int]], s: _Shape) -> float:
    """float32 MB of one decoder layer's matrices plus the output head (a dequantizing graph's copies)."""
    linear = [rows * cols for kind, rows, cols in tensors if kind == "linear"]
    per_layer = sum(linear[: len(linear) // s.layers]) if s.layers else 0
    head = linear[-1] if len(linear) % max(s.layers, 1) else 0
    return (per_layer + head) * F32 / MB


def _frozen_shapes(c: dict, s: _Shape) -> list[tuple[str, int, int]]:
    """(kind, rows, cols) of the frozen weights: 2-D matrices (quantized by export --quantize) and
    1-D norms and biases as (kind "vector", 1, n), which stay float32."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = [("linear", q, s.hidden), ("linear", kv, s.hidden), ("linear", kv, s.hidden), ("linear", s.hidden, q)]
    layer += [("linear", s.intermediate, s.hidden)] * 2 + [("linear", s.hidden, s.intermediate)]
    layer += [("vector", 1, s.hidden)] * 4 + [("vector", 1, s.head_dim)] * 2  # norms (at most: gemma3's)
    if c.get("model_type") == "qwen2" or c.get("attention_bias"):
        layer += [("vector", 1, q + 2 * kv)]
    tensors = [("embedding", s.vocab, s.hidden), ("vector", 1, s.hidden)] + layer * s.layers
    if not c.get("tie_word_embeddings", model_facts(c["model_type"]).tied_default):
        tensors.append(("linear", s.vocab, s.hidden))
    return tensors


def _stored_bytes(kind: str, rows: int, cols: int, scheme: str | None, block: int) -> float:
    """Bytes of one frozen tensor in weights.safetensors (layouts: edgeft/host/quantize.py)."""
    if scheme is None or kind == "vector":
        return rows * cols * F32
    if scheme == "int8":
        return rows * cols + rows * F32
    return rows * math.ceil(cols / block) * (block // 2 + F32)


def _lora_parameters(c: dict, s: _Shape, r: int) -> int:
    """LoRA A and B of the type's default targets: r x (in + out) per module and layer."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    dims = {
        "q_proj": (s.hidden, q),
        "k_proj": (s.hidden, kv),
        "v_proj": (s.hidden, kv),
        "o_proj": (q, s.hidden),
        "qkv_proj": (s.hidden, q + 2 * kv),
    }
    targets = model_facts(c["model_type"]).lora_targets
    return s.layers * sum(r * (i + o) for i, o in (dims[t] for t in targets))


def plan_model_dir(
    model_dir: Path,
    batch_size: int,
    max_seq_len: int | None,
    profile: str | None,
    budget_mb: float | None,
    lora_r: int,
    block_size: int,
    as_json: bool,
) -> str:
    """``edgeft plan MODEL_DIR``: the table (or JSON) of every precision x recompute setting."""
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgeftError("--quant-block-size must be a power of two >= 16 (MatMulNBits)")
    config = read_model_config(model_dir)
    source = "--memory-budget"
    seq = max_seq_len
    if profile is not None:
        from edgeft.profiles import load_profile

        device = load_profile(profile)
        seq = seq or device.defaults.max_seq_len
        if budget_mb is None:
            budget_mb, source = float(device.ram_budget_mb), f"profile {device.name}"
    if budget_mb is None:
        budget_mb, source = available_memory_mb(), "available on this machine"
    seq = seq or 512
    rows = plan_model(config, batch_size, seq, budget_mb, lora_r, block_size)
    if as_json:
        return json.dumps({"budget_mb": budget_mb, "plans": [r.as_dict() for r in rows]})
    return _model_report(model_dir, config, rows, budget_mb, source, lora_r, block_size)


def _model_report(
    model_dir: Path, config: dict, rows: list[ModelPlan], budget: float | None, source: str, r: int, block: int
) -> str:
    shape = _Shape.from_config(config)
    params = sum(a * b for _, a, b in _frozen_shapes(config, shape))
    tied = config.get("tie_word_embeddings", model_facts(config["model_type"]).tied_default)
    first = rows[0].plan
    targets = ",".join(model_facts(config["model_type"]).lora_targets)
    lines = [
        f"model     {config['model_type']}, {params / 1e6:.0f} M parameters ({shape.layers} layers, hidden "
        f"{shape.hidden}, vocab {shape.vocab}{', tied embeddings' if tied else ''})",
        f"plan      LoRA r={r} on {targets}; batch {first.batch_size} x {first.max_seq_len} tokens; "
        f"runtime {first.runtime_mb:.0f} MB (onnxruntime, device venv)",
        f"budget    {f'{budget:.0f} MB' if budget is not None else 'unknown'} ({source})",
        "",
        "PRECISION     RECOMPUTE  WEIGHTS MB  TRAIN PEAK MB  SERVE PEAK MB  FITS",
    ]
    for row in rows:
        p = row.plan
        fits = "?" if row.fits is None else "yes" if row.fits else "no"
        recompute = row.recompute + ("*" if row.recompute == "layers" else "")
        lines.append(
            f"{row.precision:<12}  {recompute:<9}  {p.weights_mb:>10.0f}  {row.train_peak_mb:>13.0f}  "
            f"{p.serve_peak_mb:>13.0f}  {fits}"
        )
    lines += [
        "",
        "* layer recomputation (export --recompute auto, the default; edgeft train picks it when needed):",
        "  each layer keeps its input, one layer's activations exist at a time during the backward.",
        "int4-dequant: export --quantize int4 --quant-compute dequant (no second Wᵀ layout; training",
        "  dequantizes one layer's weights at a time).",
    ]
    fitting = [row for row in rows if row.fits]
    if fitting:
        best = fitting[0]  # the highest precision that fits, without recompute if it can
        options = EXPORT_FLAGS[best.precision]
        lines.append(f"export:   edgeft export {model_dir} --out BUNDLE{options} --max-seq-len {first.max_seq_len}")
        if best.recompute == "layers":
            lines.append("          (edgeft train then recomputes layers at this batch and sequence: --recompute auto)")
    elif budget is not None:
        hint = _smaller_setting(config, rows, r, block)
        lines.append(f"nothing fits {budget:.0f} MB at batch {first.batch_size} x {first.max_seq_len}; {hint}")
    return "\n".join(lines)


def _smaller_setting(config: dict, rows: list[ModelPlan], r: int, block: int) -> str:
    """The largest batch (then sequence) at which the most frugal setting fits the budget."""
    last = rows[-1]
    batch, seq = last.plan.batch_size, last.plan.max_seq_len
    while batch > 1 or seq > 2:
        batch, seq = (batch - 1, seq) if batch > 1 else (1, seq // 2)
        row = plan_model(config, batch, seq, last.budget_mb, r, block)[-1]
        if row.fits:
            return f"{last.precision} with recompute {last.recompute} fits at batch {batch} x {seq}"
    return "not even batch 1 x 2 fits"
