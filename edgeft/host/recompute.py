"""Host passes: layer recomputation. The backward of each decoder layer recomputes that layer's
forward from the layer's inputs instead of keeping its activations from the forward pass
(``recompute_layers``), or only its attention probabilities, the batch x heads x seq^2 tensors,
from the query, key and mask it keeps anyway (``recompute_attention``, applied to every plain
training graph).

After the gradient graph is built, every tensor a decoder layer's forward produces and the backward
reads is "saved" (kept alive from the forward to the backward). For each layer this pass clones the
forward nodes those tensors need, starting from what the layer receives (its residual input, the
shared mask and rotary tables, the weights), and points the backward at the clones. The forward
activations then die as soon as the forward is done with them; during the backward one layer's are
alive at a time. Values are unchanged (the same ops on the same inputs).

A quantized bundle's dequantization chains (``{weight}/dq/...``, edgeft/host/quantize.py) are cloned
with the layer that reads them, though they sit outside its scope: read from the forward, each
layer's float32 weights would stay alive until its backward, all layers' at once.

Kept as they are: Dropout nodes (a second draw would differ from the forward's mask) and anything
outside the decoder layers (embedding, final norm, head, loss). The device must run these graphs
with onnxruntime's common-subexpression elimination off, which would merge the clones back into
the forward (``edgeft.device.runtime.graph_session``).
"""

from __future__ import annotations

import re
from collections import defaultdict

from edgeft.host.graph import producers, set_nodes

LAYER = re.compile(r"^/(?:[^/]+/)*?layers?\.(\d+)/")  # the exporter's scopes: /model/layers.3/, /bert/encoder/layer.3/
SUFFIX = "/rc"
KEEP_OPS = {"Dropout"}  # random: recomputing would draw another mask
ATTENTION_SUFFIX = "/ra"  # recompute_attention's clones
PROBABILITY_OPS = {"Softmax"}  # attention probabilities: the batch x heads x seq^2 tensors a backward keeps
MATMUL_OPS = {"MatMul", "FusedMatMul"}
DEQUANT = "/dq/"  # in the names of quantize.py's dequantization nodes: recomputed with their layer


def recompute_layers(graph, loss: str = "loss") -> int:
    """Rewrite ``graph`` (a lowered training graph) in place; returns how many layers now recompute."""
    made_by = producers(graph)
    forward = _ancestors(made_by, [loss])
    saved = _saved_by_layer(graph, made_by, forward)
    return _rewrite(graph, forward, {n: _clone_layer(n, t, made_by, forward) for n, t in sorted(saved.items())})


def recompute_attention(graph, loss: str = "loss") -> int:
    """Rewrite ``graph`` in place so that no layer keeps its attention probabilities (batch x heads x
    seq^2) for the backward: each layer's backward recomputes them from the query, key and mask it
    keeps anyway (the scores' gradient reads them). Returns how many layers now recompute them."""
    made_by = producers(graph)
    forward = _ancestors(made_by, [loss])
    saved = _saved_by_layer(graph, made_by, forward)
    clones = {}
    for layer, tensors in sorted(saved.items()):
        probabilities = [t for t in tensors if made_by[t].op_type in PROBABILITY_OPS]
        if probabilities:
            clones[layer] = _clone_layer(layer, probabilities, made_by, forward, scores_only=True)
    return _rewrite(graph, forward, clones)


def _rewrite(graph, forward: set[int], clones: dict[int, tuple]) -> int:
    """Point the backward at the clones (per layer: nodes, {original tensor: clone}) and place each
    layer's clones before the first backward node that reads them."""
    inserts: dict[int, list] = {}  # index of a backward node -> clones to place before it
    position = {id(n): i for i, n in enumerate(graph.node)}
    for nodes, renamed in clones.values():
        if not nodes:
            continue
        first = len(graph.node)
        for node in graph.node:
            if id(node) in forward:
                continue
            hit = [i for i, name in enumerate(node.input) if name in renamed]
            for i in hit:
                node.input[i] = renamed[node.input[i]]
            if hit:
                first = min(first, position[id(node)])
        inserts.setdefault(first, []).extend(nodes)
    body = []
    for i, node in enumerate(graph.node):
        body.extend(inserts.get(i, []))
        body.append(node)
    set_nodes(graph, body)
    return sum(1 for nodes, _ in clones.values() if nodes)


def _ancestors(made_by: dict, outputs: list[str]) -> set[int]:
    """ids of the nodes needed to compute ``outputs`` (the forward pass, for the loss)."""
    seen: set[int] = set()
    stack = list(outputs)
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(i for i in node.input if i)
    return seen


def _saved_by_layer(graph, made_by: dict, forward: set[int]) -> dict[int, list[str]]:
    """Per decoder layer: the tensors its forward nodes produce that a backward node reads."""
    saved: dict[int, list[str]] = defaultdict(list)
    for node in graph.node:
        if id(node) in forward:
            continue
        for name in node.input:
            src = made_by.get(name)
            match = LAYER.match(src.name) if src is not None and id(src) in forward else None
            if match and src.op_type not in KEEP_OPS and name not in saved[int(match.group(1))]:
                saved[int(match.group(1))].append(name)
    return saved


def _clone_layer(layer: int, tensors: list[str], made_by: dict, forward: set[int], scores_only: bool = False):
    """Clones (in topological order) of the layer's forward nodes that produce ``tensors``, and the
    renaming {original tensor: recomputed tensor}. The walk stops at anything made outside the layer;
    with ``scores_only`` also at a Shape (reused) and at a matmul's inputs (the scores' Q and Kᵀ)."""
    order: list = []
    seen: set[int] = set()

    def visit(name: str) -> None:
        node = made_by.get(name)
        if node is None or id(node) not in forward or id(node) in seen or node.op_type in KEEP_OPS:
            return
        match = LAYER.match(node.name)
        if DEQUANT not in node.name and (not match or int(match.group(1)) != layer):
            return
        if scores_only and node.op_type == "Shape":
            return
        seen.add(id(node))
        for i in node.input if not (scores_only and node.op_type in MATMUL_OPS) else ():
            if i:
                visit(i)
        order.append(node)

    for name in tensors:
        visit(name)
    tail = ATTENTION_SUFFIX if scores_only else SUFFIX
    suffix = {id(n): f"{tail}{layer}" if DEQUANT in n.name else tail for n in order}
    renamed = {o: o + suffix[id(node)] for node in order for o in node.output if o}
    clones = []
    for node in order:
        clone = type(node)()
        clone.CopyFrom(node)
        clone.name = node.name + suffix[id(node)]
        clone.input[:] = [renamed.get(i, i) for i in node.input]
        clone.output[:] = [renamed.get(o, o) for o in node.output]
        clones.append(clone)
    return clones, {t: renamed[t] for t in tensors if t in renamed}
