"""Host pass: rewrite the training-only ops of ORT's gradient graph into standard ONNX ops.

onnxruntime-training's gradient builder (host only) emits a few ops that only its training build
registers. Each has a short exact equivalent in standard ops (opset 17) that plain onnxruntime
(>= 1.20, every platform with a wheel) runs. One rule per op; each is checked numerically against
the training-build kernel in tests/test_lower.py. The entry point is :func:`lower`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeft.errors import EdgeftError
from edgeft.host.graph import Builder, attr, constant_value, nonstandard_ops, producers, prune_opsets, set_nodes

RULES: dict[str, Callable] = {}


def rule(op_type: str):
    def register(fn):
        RULES[op_type] = fn
        return fn

    return register


class LoweringError(EdgeftError):
    pass


def lower(model) -> dict[str, int]:
    """Rewrite every training-only node of ``model`` in place; returns {op: count}. Raises
    LoweringError naming the op when a non-standard op without a rule is left over."""
    graph = model.graph
    index = producers(graph)
    body, counts, constants = [], {}, []
    for node in graph.node:
        fn = RULES.get(node.op_type) if node.domain == "com.microsoft" else None
        if fn is None:
            body.append(node)
            continue
        b = Builder(node.name or node.output[0])
        fn(node, b, lambda name: constant_value(graph, name, index))
        body += b.nodes
        constants += b.constants
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    set_nodes(graph, body)
    graph.initializer.extend(constants)
    prune_opsets(model)
    left = nonstandard_ops(model)
    if left:
        raise LoweringError(f"the training graph uses ops plain onnxruntime does not run: {', '.join(left)}")
    return counts


def _out(node, i: int) -> str | None:
    return node.output[i] if len(node.output) > i and node.output[i] else None


@rule("InPlaceAccumulatorV2")
def _accumulator(node, b: Builder, const) -> None:
    # edgeft sums micro-batch gradients itself; only reached if a graph still carries the node.
    b.op("Identity", [node.input[1]], [node.output[0]])


@rule("ConcatTraining")
def _concat(node, b: Builder, const) -> None:
    axis = attr(node, "axis")
    b.op("Concat", node.input, [node.output[0]], axis=axis)
    lengths = _out(node, 1)
    if lengths:  # per-input sizes along the axis (SplitTraining reads them in the backward)
        span = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
        sizes = [b.op("Shape", [x], **span) for x in node.input]
        b.op("Concat", sizes, [lengths], axis=0)


@rule("SplitTraining")
def _split(node, b: Builder, const) -> None:
    b.op("Split", node.input[:2], list(node.output), axis=attr(node, "axis", 0))


@rule("SliceGrad")
def _slice_grad(node, b: Builder, const) -> None:
    """dX = dY zero-padded back to the input's shape: Pad with begin = the normalized starts."""
    dy, shape, starts = node.input[:3]
    axes = node.input[4] if len(node.input) > 4 and node.input[4] else None
    steps = const(node.input[5]) if len(node.input) > 5 and node.input[5] else None
    if len(node.input) > 5 and node.input[5] and (steps is None or np.any(steps != 1)):
        raise LoweringError(f"SliceGrad {node.name}: only constant unit steps are supported")
    rank = b.op("Shape", [shape])
    if axes is None:
        axes = b.op("Range", [b.const(0, np.int64), b.op("Size", [starts]), b.const(1, np.int64)])
    neg = b.op("Less", [axes, b.const(0, np.int64)])
    axes = b.op("Where", [neg, b.op("Add", [axes, rank]), axes])
    dims = b.op("Gather", [shape, axes], axis=0)
    neg = b.op("Less", [starts, b.const(0, np.int64)])
    begin = b.op("Where", [neg, b.op("Add", [starts, dims]), starts])
    begin = b.op("Max", [b.op("Min", [begin, dims]), b.const(0, np.int64)])
    zeros = b.op("ConstantOfShape", [rank], value=_tensor(np.zeros(1, np.int64)))
    begin = b.op("ScatterElements", [zeros, axes, begin], axis=0)
    end = b.op("Sub", [b.op("Sub", [shape, begin]), b.op("Shape", [dy])])
    b.op("Pad", [dy, b.op("Concat", [begin, end], axis=0)], [node.output[0]])


@rule("GatherGrad")
def _gather_grad(node, b: Builder, const) -> None:
    """dX = zeros(shape) with dY added at the gathered rows (ScatterND, reduction add)."""
    shape, indices, dy = node.input
    if attr(node, "axis", 0) != 0:
        raise LoweringError(f"GatherGrad {node.name}: only axis 0 is supported")
    indices = b.op("Cast", [indices], to=7)
    first = b.op("Gather", [shape, b.const(0, np.int64)], axis=0)
    neg = b.op("Less", [indices, b.const(0, np.int64)])
    indices = b.op("Where", [neg, b.op("Add", [indices, first]), indices])
    zeros = b.op("ConstantOfShape", [shape], value=_tensor(np.zeros(1, np.float32)))
    rows = b.op("Unsqueeze", [indices, b.const([-1], np.int64)])
    b.op("ScatterND", [zeros, rows, dy], [node.output[0]], reduction="add")


@rule("SoftmaxGrad_13")
def _softmax_grad(node, b: Builder, const) -> None:
    """dX = Y * (dY - sum(dY * Y)) along the softmax axis."""
    dy, y = node.input[:2]
    axis = b.const([attr(node, "axis", -1)], np.int64)
    total = b.op("ReduceSum", [b.op("Mul", [dy, y]), axis], keepdims=1)
    b.op("Mul", [y, b.op("Sub", [dy, total])], [node.output[0]])


@rule("SoftmaxCrossEntropyLossGrad")
def _cross_entropy_grad(node, b: Builder, const) -> None:
    """dLogits = (softmax - one_hot(label)) * dY per sample, 0 where label == ignore_index."""
    dy, log_prob, label = node.input[:3]
    if len(node.input) > 3 and any(node.input[3:]):
        raise LoweringError(f"SoftmaxCrossEntropyLossGrad {node.name}: class weights are not supported")
    reduction = attr(node, "reduction", "mean")
    ignore = attr(node, "ignore_index")
    valid = None
    if ignore is not None:
        valid = b.op("Not", [b.op("Equal", [label, b.const(ignore, np.int64)])])
        label = b.op("Where", [valid, label, b.const(0, np.int64)])
    depth = b.op("Shape", [log_prob], start=1, end=2)
    one_hot = b.op("OneHot", [label, depth, b.const([0.0, 1.0], np.float32)], axis=1)
    diff = b.op("Sub", [b.op("Exp", [log_prob]), one_hot])
    weight = b.op("Cast", [valid], to=1) if valid else b.op("ConstantOfShape", [b.op("Shape", [label])], value=_ones())
    scale = dy
    if reduction == "mean":
        scale = b.op("Div", [dy, b.op("ReduceSum", [weight], keepdims=0)])
    per_sample = b.op("Mul", [weight, scale])
    b.op("Mul", [diff, b.op("Unsqueeze", [per_sample, b.const([1], np.int64)])], [node.output[0]])


@rule("SimplifiedLayerNormalizationGrad")
def _rms_norm_grad(node, b: Builder, const) -> None:
    """RMSNorm backward with r = 1/rms(x), x̂ = x r, g = dY w:
    dX = r (g - x̂ mean(g x̂)), dW = sum over rows of dY x̂."""
    dy, x, scale, inv_std = node.input[:4]
    if attr(node, "axis", -1) != -1:
        raise LoweringError(f"SimplifiedLayerNormalizationGrad {node.name}: only axis -1 is supported")
    x_hat = b.op("Mul", [x, inv_std])
    if _out(node, 0):
        g = b.op("Mul", [dy, scale])
        mean = b.op("ReduceMean", [b.op("Mul", [g, x_hat])], axes=[-1], keepdims=1)
        b.op("Mul", [inv_std, b.op("Sub", [g, b.op("Mul", [x_hat, mean])])], [node.output[0]])
    if _out(node, 1):
        rows = b.op("Concat", [b.const([-1], np.int64), b.op("Shape", [scale])], axis=0)
        flat = b.op("Reshape", [b.op("Mul", [dy, x_hat]), rows])
        b.op("ReduceSum", [flat, b.const([0], np.int64)], [node.output[1]], keepdims=0)


@rule("QuickGeluGrad")
def _quick_gelu_grad(node, b: Builder, const) -> None:
    """d/dx x·σ(αx) = σ(αx)·(1 + αx·(1 - σ(αx)))."""
    dy, x = node.input[:2]
    alpha = attr(node, "alpha", 1.702)
    ax = x if alpha == 1.0 else b.op("Mul", [x, b.const(alpha, np.float32)])
    s = b.op("Sigmoid", [ax])
    one = b.const(1.0, np.float32)
    slope = b.op("Mul", [s, b.op("Add", [one, b.op("Mul", [ax, b.op("Sub", [one, s])])])])
    b.op("Mul", [dy, slope], [node.output[0]])


@rule("TanhGrad")
def _tanh_grad(node, b: Builder, const) -> None:
    """dX = dY · (1 - Y²) with Y = tanh(X); inputs (dY, Y). Gemma's gelu_pytorch_tanh and
    logit soft-capping bring it."""
    dy, y = node.input[:2]
    slope = b.op("Sub", [b.const(1.0, np.float32), b.op("Mul", [y, y])])
    b.op("Mul", [dy, slope], [node.output[0]])


@rule("DropoutGrad")
def _dropout_grad(node, b: Builder, const) -> None:
    """dX = dY · mask / (1 - ratio), as ORT's kernel computes it (training_mode is not read)."""
    dy, mask = node.input[:2]
    ratio = node.input[2] if len(node.input) > 2 and node.input[2] else b.const(0.5, np.float32)
    keep = b.op("Sub", [b.const(1.0, np.float32), ratio])
    kept = b.op("Mul", [dy, b.op("Cast", [mask], to=1)])
    b.op("Div", [kept, keep], [node.output[0]])


def _tensor(value: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(value)


def _ones():
    return _tensor(np.ones(1, np.float32))
