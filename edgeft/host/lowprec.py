"""Host pass: the frozen int4 projections of the training graph compute in low precision, forward
and backward, instead of dequantizing every weight to float32 each step.

Each linear use of a quantized weight W [N, K] is one of two products:
- ``X · Wᵀ`` (the forward: MatMul(X, Transpose(W)), Gemm(X, W, transB=1)) becomes
  ``com.microsoft.MatMulNBits(X, W's blocks)``;
- ``dY · W`` (the backward's dX: FusedMatMul(dY, Transpose(W), transB=1), Gemm(dY, W)) becomes
  ``MatMulNBits(dY, Wᵀ's blocks)`` over a second int4 layout of Wᵀ [K, N], quantized from the
  float weight on its own (blocks along N) and stored beside W's.
``accuracy_level`` is MatMulNBits': 4 quantizes the activations block-wise to int8 and computes in
int8 (fastest); 0 dequantizes block by block and computes in float32. Uses the pass does not
recognize keep the dequantizing subgraph. LoRA, norms and the loss stay float32.
"""

from __future__ import annotations

import numpy as np

from edgeft.host.graph import Builder, attr, consumers, remove_dead_nodes, set_nodes
from edgeft.host.quantize import QuantTensor


def low_precision_matmuls(graph, quant: dict[str, QuantTensor], accuracy_level: int) -> int:
    """Rewrite every recognized product with a quantized int4 weight in place; returns how many."""
    uses = consumers(graph)
    replaced: dict[int, list] = {}  # id(node) -> the nodes that take its place
    for qt in quant.values():
        if not qt.has_transposed:
            continue
        flat = None
        for node, a, transposed, alpha in list(_products(qt.name, uses)):
            b = Builder(f"{node.name or node.output[0]}/nbits")
            if transposed:
                data, scales = _declare_transposed(graph, qt)
                k, n = qt.shape[0], qt.shape[1]
            else:
                if flat is None:  # MatMulNBits takes the block scales flat: a view of the stored [N, blocks]
                    flat = b.op("Reshape", [qt.scales_input, b.const([-1], np.int64)])
                data, scales, k, n = qt.data_input, flat, qt.shape[1], qt.shape[0]
            out = node.output[0] if alpha == 1.0 else b.name("y")
            attrs = dict(K=k, N=n, bits=4, block_size=qt.block_size, accuracy_level=accuracy_level)
            b.op("MatMulNBits", [a, data, scales], [out], domain="com.microsoft", **attrs)
            if alpha != 1.0:
                b.op("Mul", [out, b.const(alpha, np.float32)], [node.output[0]])
            replaced[id(node)] = b.nodes
            graph.initializer.extend(b.constants)
    body = []
    for node in graph.node:
        body.extend(replaced.get(id(node), [node]))
    set_nodes(graph, body)
    remove_dead_nodes(graph)  # the dequantizing subgraphs nobody reads any more
    return len(replaced)


def _declare_transposed(graph, qt: QuantTensor) -> tuple[str, str]:
    """Wᵀ's data and scales as graph inputs (external data in weights.safetensors after export)."""
    from onnx import TensorProto, helper

    data, scales = qt.transposed
    if data not in {i.name for i in graph.input}:
        data_shape, scales_shape = qt.transposed_shapes
        graph.input.append(helper.make_tensor_value_info(data, TensorProto.UINT8, list(data_shape)))
        graph.input.append(helper.make_tensor_value_info(scales, TensorProto.FLOAT, list(scales_shape)))
    return data, scales


def _products(weight: str, uses: dict):
    """(node, the other operand, uses Wᵀ's layout?, alpha) for each node computing X·Wᵀ or dY·W."""
    for use in uses.get(weight, []):
        if use.op_type == "Transpose" and list(attr(use, "perm", [1, 0])) == [1, 0]:
            for node in uses.get(use.output[0], []):
                match = _product(node, use.output[0], through_transpose=True)
                if match:
                    yield node, *match
        else:
            match = _product(use, weight, through_transpose=False)
            if match:
                yield use, *match


def _product(node, operand: str, through_transpose: bool):
    """For ``node`` reading ``operand`` (W, or Transpose(W) when ``through_transpose``) as its second
    input with nothing transposed on the first: (first input, reads W itself?, alpha), else None."""
    if len(node.input) < 2 or node.input[1] != operand or node.input[0] == operand:
        return None
    if node.op_type == "MatMul":
        trans_b = 0
    elif node.op_type == "FusedMatMul" and not attr(node, "transA", 0) and not attr(node, "transBatchA", 0):
        if attr(node, "transBatchB", 0):
            return None
        trans_b = attr(node, "transB", 0)
    elif node.op_type == "Gemm" and len(node.input) == 2 and not attr(node, "transA", 0):
        trans_b = attr(node, "transB", 0)
    else:
        return None
    # The product is X · op(operand) with op = transpose when trans_b; operand is W or Wᵀ.
    uses_w = bool(trans_b) == through_transpose  # X · W: the backward's dY · W
    return node.input[0], uses_w, float(attr(node, "alpha", 1.0))
