"""Per-model facts, one table: which model types edgeft exports and their default LoRA targets."""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.errors import EdgeftError


@dataclass(frozen=True)
class ModelFacts:
    lora_targets: tuple[str, ...]  # attention projections: the common LoRA choice (QLoRA paper, PEFT recipes)
    # Activation memory kept for backward, relative to llama's layout (measured, edgeft/device/planner.py):
    # phi3's fused qkv_proj / gate_up_proj keep their split halves as extra tensors.
    train_activation_factor: float = 1.0
    recompute_activation_factor: float = 1.0  # the same, for one layer under layer recomputation


MODEL_TABLE: dict[str, ModelFacts] = {
    "llama": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "mistral": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": ModelFacts(("q_proj", "k_proj", "v_proj", "o_proj")),
    "phi3": ModelFacts(("qkv_proj", "o_proj"), train_activation_factor=1.64, recompute_activation_factor=1.32),
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
