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
    """dX = zeros(shape) with dY added at the gathered rows (ScatterND, reduction add); along
    another axis (BERT's pooler takes token 0 on axis 1), ScatterElements with reduction add."""
    shape, indices, dy = node.input
    axis = attr(node, "axis", 0)
    indices = b.op("Cast", [indices], to=7)
    first = b.op("Gather", [shape, b.const(axis, np.int64)], axis=0)
    neg = b.op("Less", [indices, b.const(0, np.int64)])
    indices = b.op("Where", [neg, b.op("Add", [indices, first]), indices])
    zeros = b.op("ConstantOfShape", [shape], value=_tensor(np.zeros(1, np.float32)))
    if axis == 0:
        rows = b.op("Unsqueeze", [indices, b.const([-1], np.int64)])
        b.op("ScatterND", [zeros, rows, dy], [node.output[0]], reduction="add")
        return
    # dY is shape[:axis] + indices.shape + shape[axis + 1:]: flatten the indices' dims into one,
    # broadcast the indices to that shape and scatter-add along the axis.
    before = b.op("Slice", [shape, b.const([0], np.int64), b.const([axis], np.int64)])
    after_start = axis + 1 if axis != -1 else np.iinfo(np.int64).max
    after = b.op("Slice", [shape, b.const([after_start], np.int64), b.const([np.iinfo(np.int64).max], np.int64)])
    minus_one = b.const([-1], np.int64)
    updates = b.op("Reshape", [dy, b.op("Concat", [before, minus_one, after], axis=0)])
    ones = [b.op("Add", [b.op("Mul", [d, b.const(0, np.int64)]), b.const(1, np.int64)]) for d in (before, after)]
    flat = b.op("Reshape", [indices, b.op("Concat", [ones[0], minus_one, ones[1]], axis=0)])
    where = b.op("Expand", [flat, b.op("Shape", [updates])])
    b.op("ScatterElements", [zeros, where, updates], [node.output[0]], axis=axis, reduction="add")


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
    # softmax - one_hot as a scatter-add of -1 at each label: no vocab-wide one-hot tensor (one
    # buffer of batch x seq x vocab less at the loss head, and OneHot's slow kernel gone).
    at = b.op("Unsqueeze", [label, b.const([1], np.int64)])
    minus_one = b.op("ConstantOfShape", [b.op("Shape", [at])], value=_tensor(np.full(1, -1.0, np.float32)))
    diff = b.op("ScatterElements", [b.op("Exp", [log_prob]), at, minus_one], axis=1, reduction="add")
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


@rule("LayerNormalizationGrad")
def _layer_norm_grad(node, b: Builder, const) -> None:
    """LayerNorm backward with r = inv_std, x̂ = (x - mean) r, g = dY w:
    dX = r (g - mean(g) - x̂ mean(g x̂)), dW = sum over rows of dY x̂, dB = sum over rows of dY."""
    dy, x, scale, mean, inv_std = node.input[:5]
    if attr(node, "axis", -1) != -1:
        raise LoweringError(f"LayerNormalizationGrad {node.name}: only axis -1 is supported")
    x_hat = b.op("Mul", [b.op("Sub", [x, mean]), inv_std])
    if _out(node, 0):
        g = b.op("Mul", [dy, scale])
        mean_g = b.op("ReduceMean", [g], axes=[-1], keepdims=1)
        mean_gx = b.op("ReduceMean", [b.op("Mul", [g, x_hat])], axes=[-1], keepdims=1)
        centered = b.op("Sub", [b.op("Sub", [g, mean_g]), b.op("Mul", [x_hat, mean_gx])])
        b.op("Mul", [inv_std, centered], [node.output[0]])
    rows = None
    for i, term in ((1, lambda: b.op("Mul", [dy, x_hat])), (2, lambda: dy)):
        if _out(node, i):
            rows = rows or b.op("Concat", [b.const([-1], np.int64), b.op("Shape", [scale])], axis=0)
            flat = b.op("Reshape", [term(), rows])
            b.op("ReduceSum", [flat, b.const([0], np.int64)], [node.output[i]], keepdims=0)


@rule("GeluGrad")
def _gelu_grad(node, b: Builder, const) -> None:
    """d/dx x·Φ(x) = Φ(x) + x·φ(x), Φ(x) = (1 + erf(x/√2)) / 2, φ(x) = exp(-x²/2) / √(2π) (exact, erf GELU)."""
    dy, x = node.input[:2]
    f32 = np.float32
    erf = b.op("Erf", [b.op("Mul", [x, b.const(0.5**0.5, f32)])])
    cdf = b.op("Mul", [b.op("Add", [erf, b.const(1.0, f32)]), b.const(0.5, f32)])
    gauss = b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5, f32)])])
    pdf = b.op("Mul", [gauss, b.const((2 * np.pi) ** -0.5, f32)])
    b.op("Mul", [dy, b.op("Add", [cdf, b.op("Mul", [x, pdf])])], [node.output[0]])


@rule("TanhGrad")
def _tanh_grad(node, b: Builder, const) -> None:
    """dX = dY · (1 - Y²), Y = tanh(X) (BERT's pooler; Gemma's gelu-tanh and logit soft-capping)."""
    dy, y = node.input[:2]
    b.op("Mul", [dy, b.op("Sub", [b.const(1.0, np.float32), b.op("Mul", [y, y])])], [node.output[0]])


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
