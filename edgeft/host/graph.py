"""Graph editing helpers shared by the host passes (lowering, quantization, weights, decoders).

Small on purpose: a builder that names new nodes and constants uniquely, producer/consumer
indices, constant lookup, dead-node removal and the one step that turns weight inputs into
external data inside ``weights.safetensors``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np

WEIGHTS = "weights.safetensors"
# Non-standard ops that plain onnxruntime's CPU build registers (onnxruntime/docs/OperatorKernels.md):
# a lowered graph may keep these and nothing else outside the standard ONNX domain.
PLAIN_ORT_OPS = {
    ("", "SimplifiedLayerNormalization"),
    ("com.microsoft", "FusedMatMul"),
    ("com.microsoft", "QuickGelu"),
    ("com.microsoft", "Gelu"),
    ("com.microsoft", "FastGelu"),
    ("com.microsoft", "BiasGelu"),
    ("com.microsoft", "SkipLayerNormalization"),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"),
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "MatMulIntegerToFloat"),
    ("com.microsoft", "DynamicQuantizeMatMul"),
    ("com.microsoft", "RotaryEmbedding"),
    ("com.microsoft", "GroupQueryAttention"),
    ("com.microsoft", "MultiHeadAttention"),
}


class Builder:
    """Makes nodes and small constants with unique names under a prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list = []
        self.constants: list = []
        self._ids = itertools.count()

    def name(self, hint: str = "t") -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def op(self, op_type: str, inputs: Iterable[str], outputs: int | list[str] = 1, domain: str = "", **attrs):
        """Append a node; returns its single output name, or the list when ``outputs`` is a list/count > 1."""
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [self.name(op_type) for _ in range(outputs)]
        node = helper.make_node(op_type, list(inputs), names, name=self.name(op_type), domain=domain, **attrs)
        self.nodes.append(node)
        return names[0] if len(names) == 1 and not isinstance(outputs, list) else names

    def const(self, value, dtype=None) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), self.name("c"))
        self.constants.append(tensor)
        return tensor.name


def attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def producers(graph) -> dict:
    return {o: node for node in graph.node for o in node.output if o}


def consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def constant_value(graph, name: str, index: dict | None = None) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a Constant node's output, else None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = (index or producers(graph)).get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(attr(node, "value")) if attr(node, "value") is not None else None
    return None


def set_nodes(graph, nodes: list) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def remove_dead_nodes(graph) -> int:
    """Drop nodes whose outputs reach no graph output (e.g. gradients of frozen weights)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(graph.node) - len(keep)
    set_nodes(graph, keep[::-1])
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return removed


def prune_opsets(model) -> None:
    """Keep only the opset imports of domains the graph uses (the gradient builder adds seven)."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        from onnx import helper

        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def nonstandard_ops(model) -> list[str]:
    """Ops of ``model`` that plain onnxruntime's CPU build does not run (sorted, as domain::op)."""
    from onnx import defs

    bad = set()
    for node in model.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        if (domain, node.op_type) in PLAIN_ORT_OPS:
            continue
        if domain == "" and defs.has(node.op_type):
            continue
        bad.add(f"{domain or 'ai.onnx'}::{node.op_type}")
    return sorted(bad)


def strip_prefix(graph, prefix: str) -> None:
    """Remove ``prefix`` from initializer, input and node-input names (the exporter's wrapper attribute)."""
    for init in graph.initializer:
        init.name = init.name.removeprefix(prefix)
    for value in graph.input:
        value.name = value.name.removeprefix(prefix)
    for node in graph.node:
        node.input[:] = [i.removeprefix(prefix) for i in node.input]
        node.output[:] = [o.removeprefix(prefix) for o in node.output]
    for value in graph.output:
        value.name = value.name.removeprefix(prefix)


def externalize(graph, keys: dict[str, str], ranges: dict[str, tuple[int, int]], types: dict[str, int]) -> list[str]:
    """Graph inputs (and initializers) named in ``keys`` become initializers whose data is ONNX
    external data pointing at that key's bytes in weights.safetensors. Returns the names moved.

    ``ranges``: key -> (offset, length) in the file; ``types``: name -> ONNX element type."""
    import onnx

    moved = []
    present = {i.name: i for i in graph.initializer}
    for value in list(graph.input):
        if value.name in keys and value.name not in present:
            dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
            t = graph.initializer.add()  # add(), not append(): protobuf append stores a copy
            t.name, t.data_type = value.name, types.get(value.name, value.type.tensor_type.elem_type)
            t.dims.extend(dims)
            present[value.name] = t
    for name, init in present.items():
        key = keys.get(name)
        if key is None:
            continue
        if key not in ranges:
            raise KeyError(f"{name}: key {key} is not in {WEIGHTS}")
        offset, length = ranges[key]
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        del init.external_data[:]
        for k, v in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
            init.external_data.add(key=k, value=v)
        moved.append(name)
    inputs = [i for i in graph.input if i.name not in present]
    del graph.input[:]
    graph.input.extend(inputs)
    return moved
