"""Host pass: the loss head in chunks of rows. A causal-LM training graph computes, for every
labelled position, vocabulary-wide logits, their log-probabilities and, in the backward, their
gradient: tokens x vocab floats each (Llama-3.2-1B, 128256 entries: 0.5 GB per 1024 tokens, each).
This pass moves the head's forward (lm_head, softcap, cross-entropy) and its backward (the
cross-entropy's gradient, lm_head's gradient w.r.t. its input rows) into one ONNX ``Loop`` over
chunks of ``rows`` rows: each iteration computes its chunk's loss and input gradient and frees its
vocabulary-wide tensors, so they cost one chunk's, whatever the batch. Values are unchanged (a sum
of per-row terms; the head's backward needs nothing from other rows).

Applied to the lowered training graphs (after quantization and recomputation) when the head's
cut is clean: the rows reach ``lm_head`` through a Gather, the cross-entropy sums (export.py's
``loss_module``) and nothing outside the head reads its tensors (a LoRA-adapted lm_head would:
its weight gradients sum over all rows; such graphs are left as they are).
"""

from __future__ import annotations

import numpy as np

from edgeft.host.graph import Builder, attr, consumers, producers, set_nodes

PREFIX = "/loss_chunks"


def chunk_loss_head(graph, rows: int) -> bool:
    """Rewrite ``graph`` in place; False (graph unchanged) when its head does not have the expected
    shape. ``rows``: rows per chunk."""
    cut = _cut(graph)
    if cut is None:
        return False
    rows_in, targets, loss_sum, grad, body, ignore = cut
    b = Builder(PREFIX)
    size, trip, rows_padded, targets_padded = _chunks(b, rows_in, targets, rows, ignore)
    total, stacked = b.name("loss_sum"), b.name("grad_chunks")
    loop_body = _loop_body(body, {rows_in: rows_padded, targets: targets_padded}, loss_sum, grad, size)
    outputs = [total, stacked] if grad else [total]
    b.op("Loop", [trip, "", b.const(np.array(0.0, np.float32))], outputs, body=loop_body)
    if grad:  # the chunks' row gradients, stacked, as the rows' gradient without the padding
        zero, width = b.const([0], np.int64), b.op("Shape", [rows_in], start=1, end=2)
        flat = b.op("Reshape", [stacked, b.op("Concat", [b.const([-1], np.int64), width], axis=0)])
        b.op("Slice", [flat, zero, b.op("Shape", [rows_in], start=0, end=1), zero], [grad])
    inside = {id(n) for n in body}
    for node in graph.node:
        if id(node) not in inside:
            node.input[:] = [total if i == loss_sum else i for i in node.input]
    graph.initializer.extend(b.constants)
    moved = {o for n in body for o in n.output}
    kept = [v for v in graph.value_info if v.name not in moved]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    set_nodes(graph, _toposort([n for n in graph.node if id(n) not in inside] + b.nodes))
    return True


def _chunks(b: Builder, rows_in: str, targets: str, rows: int, ignore: int) -> tuple[str, str, str, str]:
    """(rows per chunk: at most ``rows``, no more than there are; how many chunks; the rows and
    targets padded to whole chunks, padded targets ignored)."""
    total = b.op("Shape", [rows_in], start=0, end=1)
    one, zero = b.const([1], np.int64), b.const([0], np.int64)
    size = b.op("Max", [b.op("Min", [total, b.const([rows], np.int64)]), one])
    count = b.op("Max", [b.op("Div", [b.op("Sub", [b.op("Add", [total, size]), one]), size]), one])
    pad = b.op("Sub", [b.op("Mul", [count, size]), total])
    rows_padded = b.op("Pad", [rows_in, b.op("Concat", [zero, zero, pad, zero], axis=0)])
    targets_padded = b.op("Pad", [targets, b.op("Concat", [zero, pad], axis=0), b.const(np.array(ignore, np.int64))])
    return size, b.op("Squeeze", [count, zero]), rows_padded, targets_padded


def _cut(graph):
    """(rows, targets, loss sum, rows' gradient (None in an eval graph), head nodes, ignore_index) or None."""
    made_by, used_by = producers(graph), consumers(graph)
    losses = [n for n in graph.node if n.op_type == "SoftmaxCrossEntropyLoss"]
    if len(losses) != 1 or attr(losses[0], "reduction") != "sum" or len(losses[0].input) > 2:
        return None
    loss = losses[0]
    ignore = attr(loss, "ignore_index")
    if ignore is None:  # padded rows must add nothing
        return None
    rows_in = _rows(loss.input[0], made_by)
    if rows_in is None:
        return None
    grad = f"{rows_in}_grad" if f"{rows_in}_grad" in made_by else None
    targets, loss_sum = loss.input[1], loss.output[0]
    after = _descendants([rows_in, targets], used_by)
    before = _ancestors([loss_sum, grad] if grad else [loss_sum], made_by)
    body = [n for n in graph.node if id(n) in after and id(n) in before]
    body = _pull_in(graph, body, used_by, _ancestors([rows_in, targets], made_by))
    inside = {id(n) for n in body}
    outputs = {o.name for o in graph.output}
    for node in body:
        for name in node.output:
            if name in (loss_sum, grad):
                continue
            if name in outputs or any(id(c) not in inside for c in used_by.get(name, [])):
                return None  # a head tensor read elsewhere (e.g. a LoRA lm_head's weight gradients)
    return rows_in, targets, loss_sum, grad, body, ignore


def _rows(logits: str, made_by: dict) -> str | None:
    """The Gather output whose rows reach lm_head (following each node's first input)."""
    name = logits
    for _ in range(16):
        node = made_by.get(name)
        if node is None:
            return None
        if node.op_type == "Gather" and attr(node, "axis", 0) == 0:
            return name
        name = node.input[0]
    return None


def _descendants(names: list[str], used_by: dict) -> set[int]:
    seen, stack = set(), list(names)
    while stack:
        for node in used_by.get(stack.pop(), []):
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.output)
    return seen


def _ancestors(names: list[str], made_by: dict) -> set[int]:
    seen, stack = set(), list(names)
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            stack.extend(node.input)
    return seen


def _pull_in(graph, body: list, used_by: dict, upstream: set[int]) -> list:
    """Add the nodes only the head reads (lm_head's Transpose or dequantization, the loss's
    gradient scale): inside the loop onnxruntime fuses the Transpose into the MatMul again, and no
    full-size float copy of a weight is made before the loop and kept through it."""
    inside = {id(n) for n in body}
    grew = True
    while grew:
        grew = False
        for node in graph.node:
            if id(node) in inside or id(node) in upstream or not node.output:
                continue
            readers = [c for o in node.output for c in used_by.get(o, [])]
            if readers and all(id(c) in inside for c in readers):
                inside.add(id(node))
                grew = True
    return [n for n in graph.node if id(n) in inside]


def _loop_body(body: list, padded: dict[str, str], loss_sum: str, grad: str | None, size: str):
    """The Loop's graph: (iteration, condition, loss so far) -> (condition, loss so far[, this chunk's
    rows' gradient])."""
    from onnx import TensorProto, helper

    b = Builder(f"{PREFIX}/body")
    iteration, condition, loss_in = (f"{PREFIX}/{n}" for n in ("iteration", "condition", "loss_in"))
    start = b.op("Mul", [b.op("Unsqueeze", [iteration, b.const([0], np.int64)]), size])
    end = b.op("Add", [start, size])
    axis = b.const([0], np.int64)
    chunk = {name: b.op("Slice", [whole, start, end, axis]) for name, whole in padded.items()}
    head, copies = len(b.nodes), []
    for node in body:
        copy = helper.make_node("Identity", [], [])
        copy.CopyFrom(node)
        copy.input[:] = [chunk.get(i, i) for i in node.input]
        copy.output[:] = [f"{grad}/chunk" if o == grad else o for o in node.output]
        copies.append(copy)
    loss_out = b.op("Add", [loss_in, loss_sum])
    condition_out = b.op("Identity", [condition])
    inputs = [
        helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
        helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
        helper.make_tensor_value_info(loss_in, TensorProto.FLOAT, []),
    ]
    outputs = [
        helper.make_tensor_value_info(condition_out, TensorProto.BOOL, []),
        helper.make_tensor_value_info(loss_out, TensorProto.FLOAT, []),
    ] + ([helper.make_tensor_value_info(f"{grad}/chunk", TensorProto.FLOAT, None)] if grad else [])
    nodes = b.nodes[:head] + copies + b.nodes[head:]
    return helper.make_graph(nodes, "loss_chunk", inputs, outputs, b.constants)


def _toposort(nodes: list) -> list:
    """``nodes`` in an order where each follows what it reads (a Loop also reads its body's
    outer-scope names); stable: a node already in order stays where it is."""
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{made_by[x] for x in _reads(n) if x in made_by} for n in nodes]
    done, order = set(), []

    def visit(i: int) -> None:
        stack = [(i, iter(sorted(needs[i])))]
        while stack:
            j, pending = stack[-1]
            nxt = next((k for k in pending if k not in done), None)
            if nxt is not None and any(nxt == s for s, _ in stack):
                raise ValueError(f"cycle through {nodes[nxt].name}")
            if nxt is None:
                stack.pop()
                if j not in done:
                    done.add(j)
                    order.append(nodes[j])
            else:
                stack.append((nxt, iter(sorted(needs[nxt]))))

    for i in range(len(nodes)):
        visit(i)
    return order


def _reads(node) -> list[str]:
    names = list(node.input)
    for a in node.attribute:
        if a.type == a.GRAPH:
            defined = (
                {o for n in a.g.node for o in n.output}
                | {i.name for i in a.g.input}
                | {t.name for t in a.g.initializer}
            )
            names += [x for n in a.g.node for x in n.input if x and x not in defined]
    return names
