"""Each lowering rule (edgeft/host/lower.py) against the training-build kernel it replaces.

The host venv runs onnxruntime-training, which registers the training-only ops: every case builds
a small graph around one such op, runs it there, lowers a copy and runs that; outputs must agree.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from edgeft.host.graph import nonstandard_ops  # noqa: E402
from edgeft.host.lower import LoweringError, lower  # noqa: E402

rng = np.random.default_rng(0)
F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
MS = "com.microsoft"


def _model(nodes, feeds: dict[str, np.ndarray], outputs: list[str], consts: dict | None = None):
    types = {np.dtype(np.float32): F, np.dtype(np.int64): I64, np.dtype(bool): B}
    inputs = [helper.make_tensor_value_info(n, types[a.dtype], list(a.shape)) for n, a in feeds.items()]
    inits = [onnx.numpy_helper.from_array(np.asarray(v), n) for n, v in (consts or {}).items()]
    outs = [helper.make_tensor_value_info(n, F, None) for n in outputs]
    graph = helper.make_graph(nodes, "case", inputs, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])


def _run(model, feeds):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _check(model, feeds, rtol=1e-5, atol=1e-6):
    want = _run(model, feeds)
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    counts = lower(lowered)
    assert counts, "the case holds no training-only op"
    assert nonstandard_ops(lowered) == []
    got = _run(lowered, feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol)
    assert any(np.abs(w).max() > 0 for w in want if w.dtype != np.int64)  # a case that cannot pass on zeros


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("axis", [1, -1])
def test_concat_training(axis):
    a, b = randn(2, 3, 4), randn(2, 3, 4) if axis == 1 else randn(2, 3, 5)
    b = randn(2, 5, 4) if axis == 1 else b
    node = helper.make_node("ConcatTraining", ["a", "b"], ["y", "lengths"], domain=MS, axis=axis)
    cast = helper.make_node("Cast", ["lengths"], ["lengths_f"], to=F)
    _check(_model([node, cast], {"a": a, "b": b}, ["y", "lengths_f"]), {"a": a, "b": b})


def test_split_training():
    x = randn(2, 8, 4)
    node = helper.make_node("SplitTraining", ["x", "split"], ["p", "q"], domain=MS, axis=1)
    _check(_model([node], {"x": x}, ["p", "q"], {"split": np.array([3, 5], np.int64)}), {"x": x})


@pytest.mark.parametrize(
    "starts,ends,axes",
    [([1, -5], [5, 1000], [1, -1]), ([0, 2], [2, -1], None), ([-100], [3], [2])],
)
def test_slice_grad(starts, ends, axes):
    x = randn(2, 6, 8)
    consts = {"starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64)}
    names = ["x", "starts", "ends"]
    if axes is not None:
        consts.update(axes=np.array(axes, np.int64), steps=np.ones(len(axes), np.int64))
        names += ["axes", "steps"]
    slice_ = helper.make_node("Slice", names, ["y"])
    shape = helper.make_node("Shape", ["x"], ["shape"])
    grad_in = ["dy", "shape", *names[1:]]
    grad = helper.make_node("SliceGrad", grad_in, ["dx"], domain=MS)
    feeds = {"x": x}
    y = _run(_model([slice_], feeds, ["y"], consts), feeds)[0]
    feeds["dy"] = randn(*y.shape)
    _check(_model([shape, grad], feeds, ["dx"], consts), feeds)


def test_gather_grad_adds_repeated_rows():
    dy = randn(5, 4)
    consts = {"shape": np.array([10, 4], np.int64), "indices": np.array([3, 1, 3, 9, 0], np.int64)}
    node = helper.make_node("GatherGrad", ["shape", "indices", "dy"], ["dx"], domain=MS, axis=0)
    _check(_model([node], {"dy": dy}, ["dx"], consts), {"dy": dy})


@pytest.mark.parametrize(
    "axis,indices",
    [(1, np.array(0, np.int64)), (1, np.array([[2, 0], [-1, 2]], np.int64)), (-1, np.array([3, 3, 0], np.int64))],
)
def test_gather_grad_other_axes(axis, indices):
    """BERT's pooler gathers token 0 on axis 1 (a scalar index); repeated and negative indices add up."""
    x = randn(2, 5, 4)
    gather = helper.make_node("Gather", ["x", "indices"], ["y"], axis=axis)
    y = _run(_model([gather], {"x": x}, ["y"], {"indices": indices}), {"x": x})[0]
    dy = randn(*y.shape)
    consts = {"shape": np.array(x.shape, np.int64), "indices": indices}
    node = helper.make_node("GatherGrad", ["shape", "indices", "dy"], ["dx"], domain=MS, axis=axis)
    _check(_model([node], {"dy": dy}, ["dx"], consts), {"dy": dy})


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_grad(axis):
    x, dy = randn(2, 3, 5), randn(2, 3, 5)
    softmax = helper.make_node("Softmax", ["x"], ["y"], axis=axis)
    grad = helper.make_node("SoftmaxGrad_13", ["dy", "y"], ["dx"], domain=MS, axis=axis)
    _check(_model([softmax, grad], {"x": x, "dy": dy}, ["dx"]), {"x": x, "dy": dy})


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("extra", [(), (2,)])  # (N, C) and (N, C, d) logits
def test_softmax_cross_entropy_grad(reduction, extra):
    logits = randn(6, 7, *extra) * 3
    labels = np.array([1, -100, 6, 0, -100, 3], np.int64)
    labels = np.stack([labels, np.roll(labels, 1)], axis=-1) if extra else labels
    dy = randn(*labels.shape) if reduction == "none" else np.array(0.37, np.float32)
    attrs = {"reduction": reduction, "ignore_index": -100}
    fwd = helper.make_node("SoftmaxCrossEntropyLoss", ["logits", "labels"], ["loss", "log_prob"], **attrs)
    grad = helper.make_node(
        "SoftmaxCrossEntropyLossGrad", ["dy", "log_prob", "labels"], ["dlogits"], domain=MS, **attrs
    )
    feeds = {"logits": logits, "labels": labels, "dy": dy}
    _check(_model([fwd, grad], feeds, ["dlogits"]), feeds)


def test_simplified_layer_norm_grad():
    x, w, dy = randn(2, 3, 16) * 2, randn(16), randn(2, 3, 16)
    fwd = helper.make_node("SimplifiedLayerNormalization", ["x", "w"], ["y", "inv_std"], axis=-1, epsilon=1e-6)
    grad = helper.make_node(
        "SimplifiedLayerNormalizationGrad", ["dy", "x", "w", "inv_std"], ["dx", "dw"], domain=MS, axis=-1
    )
    feeds = {"x": x, "w": w, "dy": dy}
    _check(_model([fwd, grad], feeds, ["dx", "dw"]), feeds, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("outputs", [["dx", "dw", "db"], ["dx"]])
def test_layer_norm_grad(outputs):
    """BERT's LayerNorm; the training graph asks for dX only (its weights are frozen)."""
    x, w, bias, dy = randn(2, 3, 16) * 2 + 1, randn(16), randn(16), randn(2, 3, 16)
    fwd = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y", "mean", "inv_std"], axis=-1, epsilon=1e-12)
    grad = helper.make_node(
        "LayerNormalizationGrad", ["dy", "x", "w", "mean", "inv_std"], ["dx", "dw", "db"], domain=MS, axis=-1
    )
    feeds = {"x": x, "w": w, "b": bias, "dy": dy}
    _check(_model([fwd, grad], feeds, outputs), feeds, rtol=2e-5, atol=2e-6)


def test_gelu_grad():
    x, dy = randn(3, 10) * 3, randn(3, 10)
    grad = helper.make_node("GeluGrad", ["dy", "x"], ["dx"], domain=MS)
    _check(_model([grad], {"x": x, "dy": dy}, ["dx"]), {"x": x, "dy": dy})


def test_tanh_grad():
    x, dy = randn(3, 10) * 2, randn(3, 10)
    tanh = helper.make_node("Tanh", ["x"], ["y"])
    grad = helper.make_node("TanhGrad", ["dy", "y"], ["dx"], domain=MS)
    _check(_model([tanh, grad], {"x": x, "dy": dy}, ["dx"]), {"x": x, "dy": dy})


@pytest.mark.parametrize("alpha", [1.0, 1.702])
def test_quick_gelu_grad(alpha):
    x, dy = randn(3, 10) * 4, randn(3, 10)
    grad = helper.make_node("QuickGeluGrad", ["dy", "x"], ["dx"], domain=MS, alpha=alpha)
    _check(_model([grad], {"x": x, "dy": dy}, ["dx"]), {"x": x, "dy": dy})


@pytest.mark.parametrize("training", [True, False])
def test_dropout_grad(training):
    dy, mask = randn(4, 9), rng.random((4, 9)) > 0.3
    consts = {"ratio": np.array(0.3, np.float32), "mode": np.array(training)}
    grad = helper.make_node("DropoutGrad", ["dy", "mask", "ratio", "mode"], ["dx"], domain=MS)
    _check(_model([grad], {"dy": dy, "mask": mask}, ["dx"], consts), {"dy": dy, "mask": mask})


def test_an_op_without_a_rule_is_named():
    x = randn(3, 4)
    node = helper.make_node("BiasSoftmax", ["x", "x"], ["y"], domain=MS)
    with pytest.raises(LoweringError, match="com.microsoft::BiasSoftmax"):
        lower(_model([node], {"x": x}, ["y"]))
