"""Per-model facts, one table: which model types edgeft exports, for which tasks, and their default LoRA targets."""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.errors import EdgeftError
from edgeft.tasks import CAUSAL_LM, SEQ_CLS, TOKEN_CLS


@dataclass(frozen=True)
class ModelFacts:
    lora_targets: tuple[str, ...]  # attention projections: the common LoRA choice (QLoRA paper, PEFT recipes)
    # Activation memory kept for backward, relative to llama's layout (measured, edgeft/device/planner.py):
    # phi3's fused qkv_proj / gate_up_proj keep their split halves as extra tensors.
    train_activation_factor: float = 1.0
    recompute_activation_factor: float = 1.0  # the same, for one layer under layer recomputation
    tasks: tuple[str, ...] = (CAUSAL_LM, SEQ_CLS)  # edgeft export --task (edgeft/tasks.py)
    # Encoders attend both ways (no causal mask) and pool the first token ([CLS]) through their
    # pooler for seq-cls; decoders pool the last real token, as transformers' *ForSequenceClassification.
    encoder: bool = False


MODEL_TABLE: dict[str, ModelFacts] = {
    "llama": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "mistral": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": ModelFacts(("qkv_proj", "o_proj"), train_activation_factor=1.64, recompute_activation_factor=1.32),
    "bert": ModelFacts(("query", "key", "value"), tasks=(SEQ_CLS, TOKEN_CLS), encoder=True),
}


def default_lora_targets(model_type: str) -> list[str]:
    """The default LoRA target modules for ``model_type``; a clear error for unknown types."""
    facts = MODEL_TABLE.get(model_type)
    if facts is None:
        supported = ", ".join(sorted(MODEL_TABLE))
        raise EdgeftError(
            f"model_type '{model_type}' is not supported (supported: {supported}); "
            "pass --target-modules a,b,... to choose the LoRA targets yourself"
        )
    return list(facts.lora_targets)


def check_task(model_type: str, task: str) -> None:
    """Refuse a task the model type has no graphs for (an unknown type may try causal-lm only)."""
    facts = MODEL_TABLE.get(model_type)
    tasks = facts.tasks if facts else (CAUSAL_LM,)
    if task not in tasks:
        raise EdgeftError(
            f"--task {task} is not supported for model_type '{model_type}' (supported: {', '.join(tasks)})"
        )


def is_encoder(model_type: str) -> bool:
    facts = MODEL_TABLE.get(model_type)
    return bool(facts and facts.encoder)
