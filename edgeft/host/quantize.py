"""Host stage: quantized frozen base weights (``edgeft export --quantize int8|int4``).

Which tensors: every frozen 2-D weight whose graph consumers are all ``Transpose``/``MatMul``/
``Gemm`` (linear layers, ``lm_head``) or all ``Gather`` (the token embedding). Norm weights and
biases stay float32; LoRA tensors are never quantized.

Layouts (symmetric, stored in ``weights.safetensors`` under the weight's HF key, scales under
``<key>.scales``):

- ``int8``: ``q`` int8 ``[N, K]`` in [-127, 127], one float32 scale per output row ``[N, 1]``
  (``amax / 127``); ``W = q * scale``.
- ``int4``: ONNX Runtime's ``MatMulNBits`` layout: ``q`` uint8 ``[N, n_blocks, block_size / 2]``
  (two 4-bit values per byte, element ``2i`` in the low nibble), zero point 8, one float32 scale per
  block ``[N, n_blocks]`` (``amax / 7``); ``W[n, b*bs + j] = (nibble - 8) * scale[n, b]``. ``K`` is
  padded with zeros to a multiple of the block size.

In the training and eval graphs the quantized tensors and their scales are *user inputs* (not
initializers, not parameters), so ONNX Runtime cannot constant-fold them back into float32 weights;
the graph dequantizes them on every step (``Cast``/``Mul``; int4 splits the nibbles with uint8
``BitShift`` ops, as opset 17 has no ``BitwiseAnd``, then ``Cast``/``Sub``/``Mul``). In the serving decoders they are
initializers pointing into ``weights.safetensors`` (ONNX external data), dequantized the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from edgeft.host.graph import consumers, producers

SCHEMES = ("int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits accepts powers of two >= 16
DEFAULT_BLOCK_SIZE = 32
LINEAR_OPS = {"Transpose", "MatMul", "Gemm"}
DATA_SUFFIX = ".qdata"  # graph input / initializer names: <onnx name>.qdata, <onnx name>.qscales
SCALES_SUFFIX = ".qscales"
SCALES_KEY_SUFFIX = ".scales"  # weights.safetensors key of the scales: <HF key>.scales


@dataclass
class QuantTensor:
    """A frozen weight to store quantized. The codes are computed only when the weights file is
    written (``quantize``), one tensor at a time: an export never holds the whole model twice."""

    name: str  # ONNX name of the float weight the graph used
    key: str  # HF key: weights.safetensors key of the quantized data
    weight: np.ndarray = field(repr=False)  # the float weight [N, K] (a view of the model's tensor)
    scheme: str  # "int8" | "int4"
    block_size: int
    gather: bool  # consumed by Gather (embedding): dequantize the gathered rows only
    linear: bool = True  # consumed by linear ops (tied embeddings are both)
    # int4 low-precision training (edgeft/host/lowprec.py): W^T quantized on its own, [K, n_blocks, bs/2]
    # with flat scales [K * n_blocks], for the backward's dX = dY W
    has_transposed: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def dtype(self):
        return np.dtype(np.int8 if self.scheme == "int8" else np.uint8)

    @property
    def data_shape(self) -> tuple[int, ...]:
        n, k = self.shape
        return (n, k) if self.scheme == "int8" else (n, math.ceil(k / self.block_size), self.block_size // 2)

    @property
    def scales_shape(self) -> tuple[int, int]:
        return (self.shape[0], 1) if self.scheme == "int8" else self.data_shape[:2]

    def quantize(self) -> tuple[np.ndarray, np.ndarray]:
        return quantize_int8(self.weight) if self.scheme == "int8" else quantize_int4(self.weight, self.block_size)

    def quantize_transposed(self) -> tuple[np.ndarray, np.ndarray]:
        data, scales = quantize_int4(np.ascontiguousarray(self.weight.T), self.block_size)
        return data, scales.reshape(-1)

    @property
    def transposed_shapes(self) -> tuple[tuple[int, ...], tuple[int]]:
        n, k = self.shape
        blocks = math.ceil(n / self.block_size)
        return (k, blocks, self.block_size // 2), (k * blocks,)

    @property
    def data_input(self) -> str:
        return self.name + DATA_SUFFIX

    @property
    def scales_input(self) -> str:
        return self.name + SCALES_SUFFIX

    @property
    def scales_key(self) -> str:
        return self.key + SCALES_KEY_SUFFIX

    @property
    def transposed(self) -> dict[str, str]:
        """Graph name -> file key of the transposed layout's data and scales (when it exists)."""
        if not self.has_transposed:
            return {}
        return {self.name + ".qdata_t": self.key + ".t", self.name + ".qscales_t": self.key + ".t.scales"}

    def file_tensors(self) -> list[tuple[str, tuple[int, ...], np.dtype, object]]:
        """(key, shape, dtype, produce()) of the tensors this weight stores, in file order: each
        layout's data then its scales, the codes computed once when the data's turn comes."""
        out = []
        layouts = [(self.key, self.scales_key, self.data_shape, self.dtype, self.scales_shape, self.quantize)]
        if self.has_transposed:
            data_key, scales_key = self.transposed.values()
            t_data, t_scales = self.transposed_shapes
            layouts.append((data_key, scales_key, t_data, np.dtype(np.uint8), t_scales, self.quantize_transposed))
        for data_key, scales_key, data_shape, dtype, scales_shape, quantize in layouts:
            pending: dict = {}

            def data(quantize=quantize, pending=pending):
                codes, pending["scales"] = quantize()
                return codes

            out.append((data_key, data_shape, dtype, data))
            out.append((scales_key, scales_shape, np.dtype(np.float32), lambda pending=pending: pending.pop("scales")))
        return out


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_int4(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.asarray(w, np.float32)
    n, k = w.shape
    blocks = math.ceil(k / block_size)
    padded = np.zeros((n, blocks * block_size), np.float32)
    padded[:, :k] = w
    padded = padded.reshape(n, blocks, block_size)
    scale = np.abs(padded).max(axis=2) / 7.0
    scale[scale == 0] = 1.0
    q = (np.clip(np.rint(padded / scale[..., None]), -8, 7) + 8).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(packed, np.uint8), scale.astype(np.float32)


def dequantize(data: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """numpy reference of the graphs' dequantization: float32 ``[N, k]``."""
    if data.dtype == np.int8:
        return data.astype(np.float32) * scales
    lo = (data & 0x0F).astype(np.float32) - 8
    hi = (data >> 4).astype(np.float32) - 8
    vals = np.stack([lo, hi], axis=-1).reshape(data.shape[0], data.shape[1], -1) * scales[..., None]
    return vals.reshape(data.shape[0], -1)[:, :k]


def select_and_quantize(
    graph, params: dict, frozen: list[str], keys: dict, scheme: str, block_size: int, transposed: bool = False
):
    """The frozen weights to quantize (see module docstring), quantized: {onnx name: QuantTensor}.
    ``transposed``: int4 linear weights also get W^T's own layout (low-precision backward)."""
    op_types = {name: {n.op_type for n in nodes} for name, nodes in consumers(graph).items()}
    out = {}
    for name in frozen:
        w = params[name]
        ops = op_types.get(name, set())
        if w.ndim != 2 or not ops or not ops <= LINEAR_OPS | {"Gather"}:
            continue
        linear = bool(ops - {"Gather"})
        low = transposed and scheme == "int4" and linear
        out[name] = QuantTensor(name, keys[name], w, scheme, block_size, "Gather" in ops, linear, low)
    return out


def rewrite_graph(
    graph, quant: dict[str, QuantTensor], as_inputs: bool, matmul_nbits: bool = False, matmul_integer: bool = False
) -> None:
    """Replace each quantized float weight of ``graph`` by its quantized data + scales and a
    dequantizing subgraph. ``as_inputs``: data and scales become graph inputs (training/eval);
    otherwise initializers without data (the decoder export points them into weights.safetensors).
    ``matmul_nbits`` (int4 decoders): a weight used only as ``MatMul(x, Transpose(W))`` becomes one
    ``com.microsoft.MatMulNBits(x, data, scales)`` over the same bytes, with no float copy."""
    from onnx import TensorProto, helper, numpy_helper

    wanted = {np.dtype(np.uint8): matmul_nbits, np.dtype(np.int8): matmul_integer}
    nbits = {n for n in _use_matmul_nbits(graph, quant) if wanted[quant[n].dtype]}
    names = set(quant)
    kept = [i for i in graph.initializer if i.name not in names]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(inputs)
    new_nodes, consts = [], []
    for qt in quant.values():
        dtype = TensorProto.INT8 if qt.scheme == "int8" else TensorProto.UINT8
        scales = qt.scales_shape
        for name, elem, shape in (
            (qt.data_input, dtype, qt.data_shape),
            (qt.scales_input, TensorProto.FLOAT, (math.prod(scales),) if qt.name in nbits else scales),
        ):
            if as_inputs:
                graph.input.append(helper.make_tensor_value_info(name, elem, list(shape)))
            else:
                t = TensorProto(name=name, data_type=elem)  # no data: the decoder export points it into weights
                t.dims.extend(shape)
                graph.initializer.append(t)
        if qt.linear and qt.name not in nbits:
            nodes, c = _dequant(qt, qt.data_input, qt.scales_input, qt.name, lead=1)
            new_nodes += nodes
            consts += c
    if any(qt.gather for qt in quant.values()):
        body = []
        for node in graph.node:
            qt = quant.get(node.input[0]) if node.op_type == "Gather" and node.input else None
            if qt is None or not qt.gather:
                body.append(node)
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            assert axis == 0, f"Gather on {qt.name} along axis {axis}"
            tag = node.output[0]
            gd, gs = f"{tag}/qdata", f"{tag}/qscales"
            scales = qt.scales_input
            if qt.name in nbits:  # a tied embedding: its scales are declared flat for MatMulNBits/MatMulInteger
                shape = numpy_helper.from_array(np.array(qt.scales_shape, np.int64), f"{tag}/scales_shape")
                consts.append(shape)
                scales = f"{tag}/scales_rows"
                body.append(helper.make_node("Reshape", [qt.scales_input, shape.name], [scales], name=scales))
            body.append(helper.make_node("Gather", [qt.data_input, node.input[1]], [gd], name=f"{tag}/gather_q"))
            body.append(helper.make_node("Gather", [scales, node.input[1]], [gs], name=f"{tag}/gather_s"))
            nodes, c = _dequant(qt, gd, gs, node.output[0], lead=2, tag=tag)  # ids are [batch, seq]
            body += nodes
            consts += c
        del graph.node[:]
        graph.node.extend(body)
    body = list(graph.node)
    if nbits:
        body = _to_matmul_nbits(body, {n: quant[n] for n in nbits})
    del graph.node[:]
    graph.node.extend(new_nodes + body)
    graph.initializer.extend(consts)


def _use_matmul_nbits(graph, quant: dict[str, QuantTensor]) -> set[str]:
    """The weights whose linear uses are all ``Transpose(perm [1, 0])`` nodes feeding only ``MatMul``
    B inputs (a tied embedding's Gather is rewritten on its own)."""
    uses = consumers(graph)
    out = set()
    for name, qt in quant.items():
        if not qt.linear:
            continue
        users = [u for u in uses.get(name, []) if u.op_type != "Gather"]
        ok = bool(users)
        for t in users:
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
            if t.op_type != "Transpose" or perm != [1, 0]:
                ok = False
                break
            mm = uses.get(t.output[0], [])
            if not mm or any(
                m.op_type != "MatMul" or m.input[1] != t.output[0] or m.input[0] == t.output[0] for m in mm
            ):
                ok = False
                break
        if ok:
            out.add(name)
    return out


def _to_matmul_nbits(nodes: list, quant: dict[str, QuantTensor]) -> list:
    from onnx import helper

    transposed = {}  # Transpose output -> QuantTensor
    body = []
    for node in nodes:
        if node.op_type == "Transpose" and node.input[0] in quant:
            transposed[node.output[0]] = quant[node.input[0]]
            continue
        body.append(node)
    out = []
    for node in body:
        qt = transposed.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if qt is None:
            out.append(node)
            continue
        n, k = qt.shape
        if qt.scheme == "int8":  # DynamicQuantizeLinear(x) + MatMulInteger + rescale
            p = f"{node.name or node.output[0]}/int8"
            out += [
                helper.make_node(
                    "DynamicQuantizeLinear", [node.input[0]], [f"{p}/xq", f"{p}/xs", f"{p}/xz"], name=f"{p}/dq"
                ),
                helper.make_node("Transpose", [qt.data_input], [f"{p}/wt"], perm=[1, 0], name=f"{p}/wt"),
                helper.make_node("MatMulInteger", [f"{p}/xq", f"{p}/wt", f"{p}/xz"], [f"{p}/acc"], name=f"{p}/mm"),
                helper.make_node("Cast", [f"{p}/acc"], [f"{p}/accf"], to=1, name=f"{p}/cast"),
                helper.make_node("Mul", [f"{p}/accf", f"{p}/xs"], [f"{p}/y1"], name=f"{p}/xs"),
                helper.make_node("Mul", [f"{p}/y1", qt.scales_input], list(node.output), name=f"{p}/ws"),
            ]
            continue
        block = qt.block_size
        out.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], qt.data_input, qt.scales_input],
                list(node.output),
                name=f"{node.name or node.output[0]}/nbits",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
            )
        )
    return out


def ensure_ms_domain(model) -> None:
    """Declare the com.microsoft opset if the graph uses it (MatMulNBits)."""
    from onnx import helper

    if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
        o.domain == "com.microsoft" for o in model.opset_import
    ):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _dequant(qt: QuantTensor, data: str, scales: str, out: str, lead: int, tag: str | None = None):
    """Nodes computing float ``out`` ([lead dims..., K]) from quantized ``data`` and ``scales``."""
    from onnx import TensorProto, helper, numpy_helper

    p = f"{tag or qt.name}/dq"
    consts = []

    def const(name, value):
        t = numpy_helper.from_array(np.asarray(value), f"{p}/{name}")
        consts.append(t)
        return t.name

    if qt.scheme == "int8":
        cast = helper.make_node("Cast", [data], [f"{p}/f"], to=TensorProto.FLOAT, name=f"{p}/cast")
        return [cast, helper.make_node("Mul", [f"{p}/f", scales], [out], name=f"{p}/mul")], consts
    k = qt.shape[1]
    blocks, half = qt.data_shape[1], qt.data_shape[2]
    # Nibbles are split on uint8 (BitShift), so only the last three tensors are float32.
    four = const("c4", np.uint8(4))
    nodes = [
        helper.make_node("BitShift", [data, four], [f"{p}/hi"], direction="RIGHT", name=f"{p}/hi"),
        helper.make_node("BitShift", [data, four], [f"{p}/sl"], direction="LEFT", name=f"{p}/sl"),
        helper.make_node("BitShift", [f"{p}/sl", four], [f"{p}/lo"], direction="RIGHT", name=f"{p}/lo"),
        helper.make_node("Unsqueeze", [f"{p}/lo", const("ax", np.array([-1], np.int64))], [f"{p}/lo1"], name=f"{p}/u0"),
        helper.make_node("Unsqueeze", [f"{p}/hi", f"{p}/ax"], [f"{p}/hi1"], name=f"{p}/u1"),
        helper.make_node("Concat", [f"{p}/lo1", f"{p}/hi1"], [f"{p}/cat"], axis=-1, name=f"{p}/cat"),
        helper.make_node("Cast", [f"{p}/cat"], [f"{p}/f"], to=TensorProto.FLOAT, name=f"{p}/cast"),
        helper.make_node("Sub", [f"{p}/f", const("c8", np.float32(8))], [f"{p}/c"], name=f"{p}/center"),
        helper.make_node("Unsqueeze", [scales, const("ax2", np.array([-1, -2], np.int64))], [f"{p}/s"], name=f"{p}/us"),
        helper.make_node("Mul", [f"{p}/c", f"{p}/s"], [f"{p}/w"], name=f"{p}/scale"),
    ]
    flat = blocks * half * 2
    shape = const("shape", np.array([0] * lead + [flat], np.int64))
    if flat == k:
        nodes.append(helper.make_node("Reshape", [f"{p}/w", shape], [out], name=f"{p}/reshape"))
    else:
        nodes.append(helper.make_node("Reshape", [f"{p}/w", shape], [f"{p}/wp"], name=f"{p}/reshape"))
        nodes.append(
            helper.make_node(
                "Slice",
                [
                    f"{p}/wp",
                    const("st", np.array([0], np.int64)),
                    const("en", np.array([k], np.int64)),
                    const("axs", np.array([-1], np.int64)),
                ],
                [out],
                name=f"{p}/slice",
            )
        )
    return nodes, consts


def recompute_in_backward(graph, quant: dict[str, QuantTensor]) -> int:
    """Training graph: make every backward node read a weight dequantized again right where it is
    needed, instead of the forward's float copy (which ORT would otherwise keep alive from the
    forward to the backward pass: a float32 copy of every quantized weight at the step's peak).

    The forward ``Transpose(W)`` feeding a gradient ``FusedMatMul(dY, Wt, transB=1)`` becomes
    ``FusedMatMul(dY, W', transB=0)`` with ``W'`` a second dequantization of the quantized inputs.
    Its first node differs from the forward's (int8: a Cast to int32; int4: a BitShift by 0) so that
    common-subexpression elimination cannot merge it with the forward one. Returns the number of
    gradient nodes rewired."""
    from onnx import TensorProto, helper, numpy_helper

    made_by = producers(graph)
    uses = consumers(graph)
    rewired = 0
    extra: dict[str, list] = {}  # grad node name -> recompute nodes to place before it
    for name, qt in quant.items():
        if not qt.linear:
            continue
        chain = [n for n in graph.node if n.name.startswith(f"{name}/dq/")]
        if not chain or made_by.get(name) not in chain:
            continue
        for t in uses.get(name, []):
            perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
            if t.op_type != "Transpose" or perm != [1, 0]:
                continue
            for g in uses.get(t.output[0], []):
                trans_b = next((a for a in g.attribute if a.name == "transB"), None)
                if g.op_type != "FusedMatMul" or g.domain != "com.microsoft" or trans_b is None or trans_b.i != 1:
                    continue
                if len(g.input) < 2 or g.input[1] != t.output[0] or g.input[0] == t.output[0]:
                    continue
                tag = f"{g.name or g.output[0]}/rq"
                rename = {name: f"{tag}/w"}
                # A distinct first node, so that common-subexpression elimination cannot merge the
                # clone with the forward chain: int8 casts via int32, int4 shifts by 0 first.
                head = f"{tag}/head"
                if qt.scheme == "int8":
                    nodes = [helper.make_node("Cast", [qt.data_input], [head], to=TensorProto.INT32, name=head)]
                else:
                    zero = f"{tag}/zero"
                    graph.initializer.append(numpy_helper.from_array(np.array(0, np.uint8), zero))
                    nodes = [helper.make_node("BitShift", [qt.data_input, zero], [head], direction="RIGHT", name=head)]
                for n in chain:
                    clone = helper.make_node(n.op_type, [], [], name=f"{tag}/{n.name}")
                    clone.CopyFrom(n)
                    clone.name = f"{tag}/{n.name}"
                    clone.input[:] = [head if i == qt.data_input else i for i in clone.input]
                    clone.input[:] = [
                        rename.get(i, f"{tag}/{i}" if made_by.get(i) in chain else i) for i in clone.input
                    ]
                    clone.output[:] = [rename.get(o, f"{tag}/{o}") for o in n.output]
                    nodes.append(clone)
                g.input[1] = rename[name]
                trans_b.i = 0
                extra[g.name or g.output[0]] = nodes
                rewired += 1
    if extra:
        body = []
        for node in graph.node:
            body.extend(extra.get(node.name or node.output[0], []))
            body.append(node)
        del graph.node[:]
        graph.node.extend(body)
    return rewired
