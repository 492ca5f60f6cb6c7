"""What a bundle's model does, shared by host and device (no torch): the task and its labels.

``causal-lm`` (the default, and every bundle without a ``task`` field) predicts the next token;
``seq-cls`` gives one label per text, ``token-cls`` one label per word. The manifest records a
classification bundle's task as ``{"type", "labels", "pooling"}`` (SPEC section 3d).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.errors import EdgeftError

CAUSAL_LM, SEQ_CLS, TOKEN_CLS = "causal-lm", "seq-cls", "token-cls"
TASKS = (CAUSAL_LM, SEQ_CLS, TOKEN_CLS)
CLASSIFICATION = (SEQ_CLS, TOKEN_CLS)
# PEFT task types (LoraConfig.task_type) and transformers auto classes per task.
PEFT_TASK_TYPE = {CAUSAL_LM: "CAUSAL_LM", SEQ_CLS: "SEQ_CLS", TOKEN_CLS: "TOKEN_CLS"}
AUTO_CLASS = {
    CAUSAL_LM: "AutoModelForCausalLM",
    SEQ_CLS: "AutoModelForSequenceClassification",
    TOKEN_CLS: "AutoModelForTokenClassification",
}


@dataclass(frozen=True)
class Task:
    type: str = CAUSAL_LM
    labels: tuple[str, ...] = ()

    @property
    def is_classification(self) -> bool:
        return self.type in CLASSIFICATION

    @classmethod
    def of(cls, manifest: dict) -> Task:
        """The task recorded in a (schema-valid) manifest; no ``task`` field means causal-lm."""
        task = manifest.get("task")
        if task is None:
            return cls()
        if task["type"] not in TASKS:
            raise EdgeftError(
                f"the bundle's task {task['type']!r} is not supported by this edgeft ({', '.join(TASKS)}); "
                "upgrade edgeft on this device"
            )
        return cls(task["type"], tuple(task.get("labels", ())))


def check_labels(task: str, labels: list[str] | None) -> list[str]:
    """The ``--labels`` of an export: required for classification (at least two, unique, non-empty),
    refused for causal-lm."""
    if task not in TASKS:
        raise EdgeftError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    if task == CAUSAL_LM:
        if labels:
            raise EdgeftError("--labels is for --task seq-cls or token-cls")
        return []
    if not labels or len(labels) < 2:
        raise EdgeftError(f"--task {task} needs --labels with at least two names, e.g. --labels a,b,c")
    seen = set()
    for name in labels:
        if not name or name != name.strip():
            raise EdgeftError(f"--labels: label {name!r} is empty or has surrounding spaces")
        if name in seen:
            raise EdgeftError(f"--labels: label {name!r} is given twice")
        seen.add(name)
    return list(labels)


def require(task: Task, wanted: tuple[str, ...], command: str) -> None:
    """Refuse to run ``command`` on a bundle made for another task, naming what to use instead."""
    if task.type in wanted:
        return
    if task.is_classification:
        hint = "use edgeft predict, eval or serve's /v1/classify"
    else:
        hint = "export the model with --task seq-cls or token-cls for that"
    raise EdgeftError(f"{command} needs a {' or '.join(wanted)} bundle, but this bundle is {task.type}; {hint}")
