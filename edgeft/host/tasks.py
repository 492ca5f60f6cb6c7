"""Host side of the classification tasks (``seq-cls``, ``token-cls``): the transformers model with
its head, and the torch module whose ONNX export is the training graph.

The head (BERT's ``classifier``, a decoder's ``score``) is trained in full, as PEFT does with
``task_type`` SEQ_CLS / TOKEN_CLS (``modules_to_save``): its weights are trainable graph inputs
like the LoRA tensors and are saved where PEFT saves them.
"""

from __future__ import annotations

from pathlib import Path

from edgeft.models import is_encoder
from edgeft.tasks import AUTO_CLASS, SEQ_CLS, Task


def load_model(model_dir: Path, task: Task, hf_config: dict, pad_token_id: int | None):
    """``AutoModelFor{CausalLM,SequenceClassification,TokenClassification}`` in float32, eager
    attention; a classification head gets the task's labels (and a new head, seeded by the caller)."""
    import torch
    import transformers

    auto = getattr(transformers, AUTO_CLASS[task.type])
    if not task.is_classification:
        return auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier.weight": the head is new
    try:
        options = head_config(task, hf_config, pad_token_id)
        return auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", **options)
    finally:
        transformers.logging.set_verbosity(verbosity)


def head_config(task: Task, hf_config: dict, pad_token_id: int | None) -> dict:
    """The config fields a classification model needs: the labels, and for decoders the pad id
    that transformers' last-token pooling looks for (the bundle's config.json records them too)."""
    fields = {
        "num_labels": len(task.labels),
        "id2label": dict(enumerate(task.labels)),
        "label2id": {name: i for i, name in enumerate(task.labels)},
    }
    if hf_config.get("pad_token_id") is None and pad_token_id is not None and not is_encoder(hf_config["model_type"]):
        fields["pad_token_id"] = pad_token_id
    return fields


def classification_loss_module(peft_model, task: Task, model_type: str):
    """The torch module whose export is a classification bundle's training/eval graph:
    (input_ids, attention_mask, labels, num_loss_tokens) -> (loss, logits).

    ``loss = sum of cross-entropies over labelled items / num_loss_tokens`` (items: texts for
    seq-cls, ``labels`` [batch]; tokens for token-cls, ``labels`` [batch, seq], -100 = none).
    ``logits``: [batch, num_labels] or [batch, seq, num_labels].
    """
    import torch

    encoder = is_encoder(model_type)

    class ClassificationLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def train(self, mode: bool = True):
            # Only PEFT's LoRA dropout is a training-mode node. The model's own dropout (BERT: 0.1 on
            # hidden states, attention and the head) stays off, so training is deterministic and
            # equals torch+PEFT with the model in eval mode.
            super().train(mode)
            self.peft.eval()
            for name, module in self.peft.named_modules():
                if "lora_dropout" in name:
                    module.train(mode)
            return self

        def forward(self, input_ids, attention_mask, labels, num_loss_tokens):
            model = self.peft.base_model.model
            seq = input_ids.shape[1]
            pos = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(input_ids.shape[0], seq)
            if encoder:  # bidirectional: the model turns the 2-D mask into an additive one itself
                zeros = torch.zeros_like(input_ids)  # token_type_ids: one segment
                logits = model(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=zeros, position_ids=pos
                )
                logits = logits.logits
            else:
                logits = _decoder_logits(model, input_ids, attention_mask, pos, task)
            flat = logits.reshape(-1, logits.shape[-1]).float()
            ce = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), reduction="sum")
            return ce / num_loss_tokens, logits

    return ClassificationLoss()


def _decoder_logits(model, input_ids, attention_mask, pos, task: Task):
    """A decoder's head over its hidden states; seq-cls pools the last real token (right padding:
    position ``sum(attention_mask) - 1``), which is transformers' last non-pad token."""
    import torch

    from edgeft.host.export import _additive_mask
    from edgeft.models import attention_layout

    body = getattr(model, model.base_model_prefix)
    layout = attention_layout(model.config.to_dict())  # each layer's window, as in the causal-LM graph
    mask = layout.mask_argument(lambda window: _additive_mask(attention_mask, window))
    hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    if task.type == SEQ_CLS:
        batch, seq = input_ids.shape
        last = attention_mask.sum(dim=1) - 1
        rows = torch.arange(batch, dtype=torch.long) * seq + last
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return model.score(hidden)
