"""Layer recomputation (export --recompute, edgeft/host/recompute.py): the recomputing training graph
gives the same loss and gradients as the plain one, keeps no layer activation for the backward, and
`edgeft train --recompute auto` uses it only when the run would not fit the memory budget otherwise."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA
from helpers import first_batch, make_peft_adapter

from edgeft.bundle import Bundle
from edgeft.cli import main
from edgeft.device.adapter import load_adapter
from edgeft.device.runtime import LoraGraphs

CASES = {
    "llama": {},
    "phi3": {},
    "qwen2-dora": {"use_dora": True},
    "mistral-int4": {"quantize": "int4"},
    "llama-int4dq": {"quantize": "int4", "quant_compute": "dequant"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_gradients_equal_the_plain_graph(factory, tmp_path, case):
    """Same ops on the same inputs: loss and every LoRA gradient agree to 1e-6 relative (measured: equal)."""
    model_type = case.split("-")[0]
    path = factory.bundle(model_type, **CASES[case])
    bundle = Bundle.open(path)
    targets = bundle.manifest["lora"]["target_modules"]
    adapter = make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets, use_dora="dora" in case)
    lora = load_adapter(adapter, bundle)
    batch = first_batch(path, DATA / "train.jsonl")
    plain_loss, plain = LoraGraphs(bundle, recompute=False).loss_and_grads(lora, batch, 17.0)
    plain = {k: v.copy() for k, v in plain.items()}
    loss, grads = LoraGraphs(bundle, recompute=True).loss_and_grads(lora, batch, 17.0)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, want in plain.items():
        assert np.abs(want).max() > 0, name
        assert np.abs(grads[name] - want).max() <= 1e-6 * np.abs(want).max(), name


def test_the_backward_reads_no_layer_activation_but_layer_inputs(factory):
    """Structure: in the recomputing graph, the backward reads no tensor a decoder layer's forward
    makes for itself, only what crosses layers (the residual stream into the next layer, rotary
    tables the exporter shares); each layer's forward is cloned under '/rc'."""
    import onnx

    path = factory.bundle("llama")
    layer_of = re.compile(r"^/model/layers\.(\d+)/")
    found = {}
    for name in ("training_model.onnx", "training_recompute.onnx"):
        graph = onnx.load(str(path / name), load_external_data=False).graph
        made_by, forward = _forward(graph)

        def layer(node):
            match = layer_of.match(node.name)
            return match.group(1) if match else None

        crossing = {  # layer tensors that a forward node of another layer reads
            i
            for node in graph.node
            if id(node) in forward
            for i in node.input
            if i in made_by and layer(made_by[i]) not in (None, layer(node))
        }
        found[name] = {
            i
            for node in graph.node
            if id(node) not in forward
            for i in node.input
            if i in made_by and id(made_by[i]) in forward and layer(made_by[i]) is not None and i not in crossing
        }
        found[name + "/clones"] = sum(1 for n in graph.node if n.name.endswith("/rc"))
    assert len(found["training_model.onnx"]) > 50  # the plain graph keeps dozens of layer tensors
    assert found["training_recompute.onnx"] == set()
    assert found["training_recompute.onnx/clones"] > 100 and found["training_model.onnx/clones"] == 0


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_backward_reads_no_float_weight_the_forward_dequantized(factory, scheme):
    """A dequantizing graph (int8, int4 with --quant-compute dequant): no backward node reads a
    float32 weight the forward made, or every layer's would stay alive until its backward (measured
    before: Phi-3-mini int4 with --recompute layers grew past 21 GB, 7.8 GB without recompute)."""
    import onnx

    path = factory.bundle("llama", quantize=scheme, quant_compute="dequant")
    graph = onnx.load(str(path / "training_recompute.onnx"), load_external_data=False).graph
    _, forward = _forward(graph)
    dequantized = {o for n in graph.node if id(n) in forward and "/dq/" in n.name for o in n.output}
    kept = {i for n in graph.node if id(n) not in forward for i in n.input if i in dequantized}
    assert len(dequantized) > 10
    assert kept == set()


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gemma3_text"])
def test_recomputed_attention_equals_kept_probabilities(factory, tmp_path, monkeypatch, model_type):
    """The plain training graph keeps no layer's attention probabilities (batch x heads x seq^2) for
    the backward but recomputes them there: the same loss and gradients as the graph exported with
    the pass off, which keeps one per layer (llama: GQA; phi3: fused qkv; gemma3: soft-capped scores,
    sliding and global layers)."""
    import onnx

    from edgeft.host import recompute
    from edgeft.host.export import ExportConfig, export_bundle

    path = factory.bundle(model_type)
    monkeypatch.setattr(recompute, "recompute_attention", lambda graph, loss="loss": 0)
    kept = export_bundle(ExportConfig(factory.model(model_type), tmp_path / "kept", max_seq_len=128, recompute="none"))
    probabilities = {}
    for name, bundle_dir in (("recomputed", path), ("kept", kept)):
        graph = onnx.load(str(bundle_dir / "training_model.onnx"), load_external_data=False).graph
        made_by, forward = _forward(graph)
        probabilities[name] = {  # forward Softmax outputs a backward node reads
            i
            for n in graph.node
            if id(n) not in forward
            for i in n.input
            if i in made_by and id(made_by[i]) in forward and made_by[i].op_type == "Softmax"
        }
    manifests = [json.loads((d / "manifest.json").read_text())["graphs"]["training"] for d in (path, kept)]
    assert len(probabilities["kept"]) == 2 and probabilities["recomputed"] == set()  # two layers
    assert manifests[0]["recompute_attention"] is True and manifests[1]["recompute_attention"] is False
    bundles = [Bundle.open(path), Bundle.open(kept)]
    adapter = make_peft_adapter(
        factory.model(model_type), tmp_path / "peft", targets=bundles[0].manifest["lora"]["target_modules"]
    )
    batch = first_batch(path, DATA / "train.jsonl")
    (loss, grads), (want_loss, want) = (
        LoraGraphs(b, recompute=False).loss_and_grads(load_adapter(adapter, b), batch, 17.0) for b in bundles
    )
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for name in want:
        assert np.abs(want[name]).max() > 0, name
        assert np.abs(grads[name] - want[name]).max() <= 1e-6 * np.abs(want[name]).max(), name


def _forward(graph) -> tuple[dict, set[int]]:
    """{tensor: the node making it}, and ids of the nodes the loss needs (the forward pass)."""
    made_by = {o: n for n in graph.node for o in n.output}
    forward, stack = set(), ["loss"]
    while stack:
        node = made_by.get(stack.pop())
        if node is not None and id(node) not in forward:
            forward.add(id(node))
            stack.extend(node.input)
    return made_by, forward


def _train(path, tmp_path, *extra):
    out = tmp_path / "run"
    args = ["train", path, "--data", DATA / "train.jsonl", "--out", out, "--max-steps", 2, "--no-progress", *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result, out


def test_auto_recomputes_only_when_the_plain_graph_does_not_fit(factory, tmp_path, monkeypatch):
    """The choice, with the planner's estimates fixed (their accuracy is tests/test_planner.py's):
    plain when it fits, recomputing when only that fits, refused (naming both ways out) otherwise."""
    from dataclasses import replace

    from edgeft.device import train as train_module
    from edgeft.device.planner import plan

    path = factory.bundle("llama")
    real = plan(Bundle.open(path), 4, 128)
    monkeypatch.setattr(
        train_module, "plan", lambda *a, **k: replace(real, train_peak_mb=900.0, train_recompute_peak_mb=600.0)
    )
    for budget, expected in ((1000, False), (700, True)):
        result, out = _train(path, tmp_path / str(expected), "--memory-budget", budget, "--max-seq-len", 128)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "summary.json").read_text())["recompute"] is expected
    result, out = _train(path, tmp_path / "none", "--memory-budget", 700, "--recompute", "none")
    assert result.exit_code == 2 and "training needs about 900 MB" in result.output and not out.exists()
    result, out = _train(path, tmp_path / "tight", "--memory-budget", 500)
    assert (
        result.exit_code == 2
        and "about 600 MB at batch 4 x" in result.output
        and "with layer recomputation" in result.output
    )


def test_recompute_options_are_checked(factory, tmp_path):
    path = factory.bundle("llama", recompute="none")
    assert not (path / "training_recompute.onnx").exists()
    result, out = _train(path, tmp_path, "--recompute", "layers")
    assert result.exit_code == 2 and "--recompute none" in result.output and not out.exists()
    layers = factory.bundle("llama", recompute="layers")
    manifest = json.loads((layers / "manifest.json").read_text())
    assert manifest["graphs"]["training"]["recompute"] is True and "training_recompute" not in manifest["graphs"]
    result, out = _train(layers, tmp_path / "b", "--recompute", "none")
    assert result.exit_code == 2 and "--recompute layers" in result.output
    result = CliRunner().invoke(
        main, ["export", str(factory.model("llama")), "--out", str(tmp_path / "x"), "--recompute", "all"]
    )
    assert result.exit_code == 2 and "--recompute" in result.output
