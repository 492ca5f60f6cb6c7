"""Per-model facts, one table: which model types edgeft exports, for which tasks, their default
LoRA targets, how transformers (4.56-4.57) gives each layer its attention window, and the rope
variants edgeft traces exactly. Torch-free: the host's export and the device's planner and decoder
read it."""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.errors import EdgeftError
from edgeft.tasks import CAUSAL_LM, SEQ_CLS, TOKEN_CLS

# How a model type picks each layer's attention window in transformers:
NO_WINDOW = "none"  # full causal attention on every layer (llama ignores a sliding_window key)
ONE_WINDOW = "sliding_window"  # config.sliding_window, when set, on every layer (mistral, phi3)
LAYER_TYPES = "layer_types"  # config.layer_types[i]: "sliding_attention" layers get config.sliding_window;
# the model reads a {layer type: mask} dict (qwen2/qwen3 derive layer_types from use_sliding_window
# and max_window_layers, gemma3 from sliding_window_pattern)


@dataclass(frozen=True)
class ModelFacts:
    lora_targets: tuple[str, ...]  # attention projections: the common LoRA choice (QLoRA paper, PEFT recipes)
    windows: str = NO_WINDOW
    # Activation memory kept for backward, relative to llama's layout (measured, edgeft/device/planner.py):
    # phi3's fused qkv_proj / gate_up_proj keep their split halves as extra tensors.
    train_activation_factor: float = 1.0
    recompute_activation_factor: float = 1.0  # the same, for one layer under layer recomputation
    # tie_word_embeddings when config.json leaves it out (the config class's default; the planner
    # reads config.json without transformers).
    tied_default: bool = False
    tasks: tuple[str, ...] = (CAUSAL_LM, SEQ_CLS)  # edgeft export --task (edgeft/tasks.py)
    # Encoders attend both ways (no causal mask) and pool the first token ([CLS]) through their
    # pooler for seq-cls; decoders pool the last real token, as transformers' *ForSequenceClassification.
    encoder: bool = False


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MODEL_TABLE: dict[str, ModelFacts] = {
    "llama": ModelFacts(ATTENTION),
    "mistral": ModelFacts(ATTENTION, windows=ONE_WINDOW),
    "qwen2": ModelFacts(ATTENTION, windows=LAYER_TYPES),  # qkv biases
    "qwen3": ModelFacts(ATTENTION, windows=LAYER_TYPES),  # per-head q/k RMSNorm
    "phi3": ModelFacts(
        ("qkv_proj", "o_proj"), windows=ONE_WINDOW, train_activation_factor=1.64, recompute_activation_factor=1.32
    ),
    "gemma3_text": ModelFacts(ATTENTION, windows=LAYER_TYPES, tied_default=True),  # Gemma-3 text (1B)
    "bert": ModelFacts(("query", "key", "value"), tasks=(SEQ_CLS, TOKEN_CLS), encoder=True),
}

# Rope variants whose frequencies a traced graph reproduces: fixed at load (default, linear, llama3,
# yarn), or longrope's short/long choice, which the export turns into a Where on max(position) + 1
# (edgeft/host/export.py: longrope_for_onnx). "dynamic" (NTK) rescales on the longest sequence seen
# so far, which no graph can know.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def model_facts(model_type: str) -> ModelFacts:
    """The table's entry for ``model_type``; a clear error naming the supported types otherwise."""
    facts = MODEL_TABLE.get(model_type)
    if facts is None:
        supported = ", ".join(sorted(MODEL_TABLE))
        raise EdgeftError(
            f"model_type '{model_type}' is not supported (supported: {supported}); other architectures "
            "need their attention windows, rope and norms checked against transformers first"
        )
    return facts


def default_lora_targets(model_type: str) -> list[str]:
    """The default LoRA target modules for ``model_type``; a clear error for unknown types."""
    return list(model_facts(model_type).lora_targets)


@dataclass(frozen=True)
class AttentionLayout:
    """What a traced wrapper passes as ``attention_mask``: one mask for every layer (``per_type``
    False, ``windows`` has the one key ``"all"``) or {layer type: mask}, as transformers' models
    with ``config.layer_types`` read it. A window of None is full causal attention."""

    per_type: bool
    windows: dict[str, int | None]

    def mask_argument(self, build):
        """The ``attention_mask`` argument: ``build(window)`` once per window kind."""
        masks = {kind: build(window) for kind, window in self.windows.items()}
        return masks if self.per_type else masks["all"]


def attention_layout(config: dict) -> AttentionLayout:
    """Each layer's attention window as transformers applies it, from a *resolved* config
    (``PretrainedConfig.to_dict()``: qwen2/qwen3/gemma3 derive ``layer_types`` when loading)."""
    model_type = config.get("model_type")
    rule = model_facts(model_type).windows
    window = config.get("sliding_window")
    if config.get("use_bidirectional_attention"):
        raise EdgeftError(f"{model_type}: use_bidirectional_attention (an embedding model) is not a causal LM")
    if rule == NO_WINDOW:
        return AttentionLayout(False, {"all": None})
    if rule == ONE_WINDOW:
        return AttentionLayout(False, {"all": window or None})
    kinds = sorted(set(config.get("layer_types") or []))
    unknown = [k for k in kinds if k not in ("full_attention", "sliding_attention")]
    if unknown or not kinds:
        raise EdgeftError(f"{model_type}: layer_types {kinds} (edgeft knows full_attention and sliding_attention)")
    if "sliding_attention" in kinds and not window:
        raise EdgeftError(f"{model_type}: sliding_attention layers without a sliding_window")
    return AttentionLayout(True, {k: window if k == "sliding_attention" else None for k in kinds})


def rope_type(config: dict) -> str:
    scaling = config.get("rope_scaling") or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope(config: dict) -> None:
    """Refuse a rope variant a traced graph cannot reproduce (see ROPE_TYPES)."""
    kind = rope_type(config)
    if kind not in ROPE_TYPES:
        raise EdgeftError(
            f"{config.get('model_type')}: rope_scaling type '{kind}' is not supported "
            f"(supported: {', '.join(ROPE_TYPES)}); its frequencies depend on what the model saw before"
        )


def rope_switch(config: dict) -> int | None:
    """Longrope: the length beyond which transformers uses the long factors (they apply to every
    position of a forward whose largest position id is >= this). None for other rope types."""
    if rope_type(config) != "longrope":
        return None
    return config.get("original_max_position_embeddings") or config["max_position_embeddings"]


def check_task(model_type: str, task: str) -> None:
    """Refuse a task the model type has no graphs for."""
    tasks = model_facts(model_type).tasks
    if task not in tasks:
        raise EdgeftError(
            f"--task {task} is not supported for model_type '{model_type}' (supported: {', '.join(tasks)})"
        )


def is_encoder(model_type: str) -> bool:
    facts = MODEL_TABLE.get(model_type)
    return bool(facts and facts.encoder)
