"""Host stage: the training and eval graphs (loss; loss + LoRA gradients) in standard ONNX ops.

1. ``trace_loss`` exports the loss module with ``export_params=False``: every weight is a graph
   input, so no stage ever holds weights inside a protobuf (the 2 GB limit, host memory).
2. ``differentiate`` runs onnxruntime-training's gradient builder (host only) for the trainable
   inputs, without its gradient-accumulation nodes, then lowers the training-only ops into
   standard ones (``edgeft.host.lower``): the result runs in plain onnxruntime.
Weights become external data afterwards (``edgeft.host.graph.externalize``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from pathlib import Path

from edgeft.bundle import GRAPH_INPUTS
from edgeft.host.graph import prune_opsets, remove_dead_nodes, strip_prefix
from edgeft.host.lower import lower
from edgeft.tasks import CAUSAL_LM, SEQ_CLS

OPSET = 17
PREFIX = "peft."  # the wrapper modules hold the PEFT model as attribute ``peft``


def trace(module, args: tuple, path: Path, input_names: list[str], output_names: list[str], dynamic_axes: dict):
    """torch.onnx.export (TorchScript exporter: keeps PEFT's parameter names) with the weights as
    graph inputs; returns the loaded graph with the wrapper prefix stripped from names."""
    import onnx
    import torch

    # Only the wrapper claims training mode (the PEFT modules keep theirs): in eval mode the exporter
    # merges equal-valued weights, e.g. PEFT's all-zero initial B tensors, into one input.
    module.training = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about constants and Python control flow
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            export_params=False,
            dynamo=False,
        )
    model = onnx.load(str(path))
    path.unlink()
    strip_prefix(model.graph, PREFIX)
    return model


def trace_loss(loss_module, vocab_size: int, work: Path, task: str = CAUSAL_LM, num_labels: int = 0):
    """The forward graph: (input_ids, attention_mask, labels, num_loss_tokens, *weights) -> loss
    (causal-lm), or -> (loss, logits) for classification, whose ``labels`` are class ids: one per
    row for seq-cls ([batch]), one per token for token-cls ([batch, seq])."""
    import torch

    loss_module.train()  # PEFT's LoRA dropout stays a training-mode Dropout node
    ids = torch.randint(0, vocab_size, (2, 8))
    labels, outputs = ids.clone(), ["loss"]
    dynamic = {n: {0: "batch", 1: "seq"} for n in GRAPH_INPUTS[:3]}
    if task != CAUSAL_LM:
        labels = torch.randint(0, num_labels, (2,) if task == SEQ_CLS else (2, 8))
        outputs = ["loss", "logits"]
        if task == SEQ_CLS:
            dynamic["labels"] = {0: "batch"}
    args = (ids, torch.ones_like(ids), labels, torch.tensor(14.0))
    return trace(loss_module, args, work / "forward.onnx", list(GRAPH_INPUTS), outputs, dynamic)


def differentiate(forward, trainable: list[str]):
    """(training graph: loss + ``<name>_grad`` per trainable input, eval graph: loss), both lowered
    to ops plain onnxruntime runs. Gradients of frozen inputs are never built."""
    import onnx
    from onnxruntime.training.onnxblock._training_graph_utils import build_gradient_graph

    forward = onnx.shape_inference.infer_shapes(forward)  # static shapes: no BroadcastGradientArgs
    _layer_norm_statistics(forward.graph)
    with native_stderr_to_log():
        training, evaluation = build_gradient_graph(forward, set(trainable), set(), "loss")
    lower(training)
    for model in (training, evaluation):
        remove_dead_nodes(model.graph)  # e.g. the builder's gradients of frozen norm weights
        prune_opsets(model)
    return training, evaluation


def _layer_norm_statistics(graph) -> None:
    """Name LayerNormalization's optional Mean and InvStdDev outputs (the TorchScript exporter
    leaves them out): ORT's gradient builder reads them and fails on a node without them. BERT
    has LayerNorm; the decoders' RMSNorm is another op."""
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}_mean", f"{node.output[0]}_inv_std"])


@contextlib.contextmanager
def native_stderr_to_log():
    """ORT's gradient builder logs every graph pass at INFO from C++, ignoring the Python log
    level; send native stderr to a temp file and replay it only if the build fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
