"""Quantized frozen base (`edgeft export --quantize int8|int4`): size, eval, training, serving, PEFT.

Quantized tensors: every frozen 2-D weight (token embedding, attention/MLP projections, lm_head);
RMSNorm weights stay float32; LoRA tensors are float32 everywhere.

Tolerances (tiny random llama, CPU), from measurement:
- weights.safetensors vs the fp32 bundle's: int8 0.27x, int4 (block 32) 0.29x with the second
  layout of each W^T that low-precision training reads (--quant-compute fp32, the default, or int8), 0.16x
  without it (--quant-compute dequant) (limits 0.35x / 0.32x / 0.25x; phi3 the same).
- eval loss of a PEFT adapter, quantized vs fp32 bundle: int8 |Δ| 0.001, int4 0.012 nats (limits
  0.02 / 0.08); an adapter trained on the quantized bundle, evaluated on both: int8 0.002, int4
  0.054 nats (same limits).
- 20 AdamW steps (lr 3e-3): eval loss 6.64 -> 5.93 on both; final eval loss within 2% (relative)
  of fp32 training (measured 0.08% int8, 0.16% int4).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, MODEL_TYPES
from helpers import make_peft_adapter

from edgeft.bundle import Bundle
from edgeft.cli import main

SCHEMES = ["int8", "int4"]
SIZE_LIMIT = {"int8": 0.35, "int4": 0.32, "int4-dequant": 0.25}
# First-token logits vs torch on the dequantized weights, relative to their spread (max - min).
# int8's decoder quantizes activations per tensor (DynamicQuantizeLinear + MatMulInteger): measured
# 0.09-0.17 on the tiny random models (a wrong scale or layout gives ~1); int4's: ~5e-7.
LOGIT_TOL = {"int8": 0.25, "int4": 1e-5}
EVAL_TOL = {"int8": 0.02, "int4": 0.08}
TRAIN_GAP = 0.02
PROMPT = "Station north ridge: pump is worn. What should the crew do?"


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _data(tmp_path, lines=32, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((DATA / "train.jsonl").open().readlines()[:lines]))
    return path


def _eval(bundle, data, adapter=None) -> float:
    args = ["eval", bundle, "--data", data] + (["--adapter", adapter] if adapter else [])
    result = _run(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])["loss"]


VARIANTS = {
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int4-dequant": {"quantize": "int4", "quant_compute": "dequant"},
}


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_bundle_is_smaller(factory, variant, model_type):
    from safetensors import safe_open

    scheme = VARIANTS[variant]["quantize"]
    low_precision = variant == "int4"  # --quant-compute fp32 (the default for int4)
    fp32 = factory.bundle(model_type)
    path = factory.bundle(model_type, **VARIANTS[variant])
    ratio = (path / "weights.safetensors").stat().st_size / (fp32 / "weights.safetensors").stat().st_size
    assert ratio <= SIZE_LIMIT[variant], ratio
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == scheme
    if scheme == "int4":
        assert manifest["quantization"]["block_size"] == 32
    quantized = {p["key"] for p in manifest["parameters"] if "quantized" in p}
    names = {p["onnx"] for p in manifest["parameters"] if "quantized" in p}
    transposed = {
        k for p in manifest["parameters"] if "quantized" in p for k in p["quantized"].get("transposed", {}).values()
    }
    fp32_manifest = json.loads((fp32 / "manifest.json").read_text())
    two_d = {p["key"] for p in fp32_manifest["parameters"] if not p["trainable"] and len(p["shape"]) == 2}
    assert quantized == two_d and any("embed_tokens" in k for k in quantized) and "lm_head.weight" in quantized
    # low precision: every linear weight (not the embedding) also has W^T's layout
    assert len(transposed) == (2 * (len(quantized) - 1) if low_precision else 0)
    with safe_open(str(path / "weights.safetensors"), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            arr = f.get_tensor(key)
            if key in quantized or (key in transposed and not key.endswith(".scales")):
                assert arr.dtype == (np.int8 if scheme == "int8" else np.uint8)
            else:
                assert arr.dtype == np.float32 and (arr.ndim == 1 or key.endswith(".scales")), key
    # No weight is inside the graphs (only small constants): nothing can be folded back to fp32 at
    # export, and the decoders read the quantized bytes from weights.safetensors.
    import onnx

    for graph in ("training_model.onnx", "eval_model.onnx", "decoder_lora.onnx", "decoder.onnx"):
        model = onnx.load(str(path / graph), load_external_data=False)
        inline = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
        assert all(int(np.prod(i.dims)) <= 64 for i in inline), graph
        external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert not [i.name for i in external if i.name.endswith(".weight") and "norm" not in i.name], graph
        nodes = _all_nodes(model.graph)  # with the loss head's Loop body (edgeft/host/losshead.py)
        ops = [n.op_type for n in nodes]
        if graph.startswith("decoder"):  # linear weights: int4 MatMulNBits, int8 MatMulInteger, no float MatMul
            assert ("MatMulNBits" in ops) == (scheme == "int4"), graph
            assert ("MatMulInteger" in ops) == (scheme == "int8"), graph
        if graph == "training_model.onnx" and low_precision:  # forward and backward products: MatMulNBits
            nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
            backward = [n for n in nbits if n.input[1].endswith(".qdata_t")]
            assert backward and len(nbits) - len(backward) == len(quantized) - 1, graph
            assert not any("/dq/" in n.name and "embed_tokens" not in n.name for n in nodes)
        elif graph == "training_model.onnx":  # the backward re-dequantizes (no float copy kept alive)
            assert any("/rq/" in n.name for n in nodes)
            produced = {o: n for n in nodes for o in n.output}
            for node in nodes:
                if node.op_type == "FusedMatMul" and "_Grad" in node.name:
                    src = produced.get(node.input[1])
                    assert not (src is not None and src.op_type == "Transpose" and src.input[0] in names), node.name


def _all_nodes(graph) -> list:
    """The graph's nodes and those of its subgraphs (Loop bodies)."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes += [n for a in node.attribute if a.type == a.GRAPH for n in _all_nodes(a.g)]
    return nodes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantization_matches_numpy(factory, scheme):
    """The stored layout decodes (numpy reference of the graph's ops) to within a quantization step."""
    from safetensors.numpy import load_file

    from edgeft.host.quantize import dequantize

    fp32 = load_file(str(factory.bundle("llama") / "weights.safetensors"))
    quant = load_file(str(factory.bundle("llama", quantize=scheme) / "weights.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    w = fp32[key]
    got = dequantize(quant[key], quant[key + ".scales"], w.shape[1])
    step = quant[key + ".scales"].max()
    assert got.shape == w.shape and np.abs(got - w).max() <= 0.5 * step + 1e-7


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_eval_loss_close_to_fp32_and_serves(factory, tmp_path, scheme, model_type):
    """Every supported model type: a PEFT adapter's eval loss on the quantized bundle stays within
    the tolerance of the fp32 bundle's, and the quantized decoder generates with it."""

    targets = ["qkv_proj"] if model_type == "phi3" else ["q_proj", "v_proj"]
    adapter = make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets, b_std=0.1)
    data = _data(tmp_path, 16)
    quantized = factory.bundle(model_type, quantize=scheme)
    ref = _eval(factory.bundle(model_type), data, adapter)
    got = _eval(quantized, data, adapter)
    assert abs(got - ref) <= EVAL_TOL[scheme], (got, ref)
    # The quantized decoder's logits are torch's on the dequantized weights: int4's MatMulNBits
    # computes in float32; int8's decoder also quantizes activations (uint8 per tensor).
    import torch
    from helpers import torch_model_like_bundle

    from edgeft.device.decoder import Sampling
    from edgeft.device.generate import TextGenerator

    gen = TextGenerator(quantized)
    gen.decoder.add_adapter("a", adapter)
    prompt = gen.encode(PROMPT)
    stream = gen.stream(prompt, "a", Sampling(max_new_tokens=8))
    text = "".join(stream)
    assert stream.tokens and (len(stream.tokens) == 8 or stream.finish_reason == "stop") and text == stream.text
    rows = []
    first = list(gen.decoder.generate_ids(prompt, "a", Sampling(max_new_tokens=1), set(), observe=rows.append))
    with torch.no_grad():
        model = torch_model_like_bundle(factory.model(model_type), quantized, adapter)
        want = model(torch.tensor([prompt])).logits[0, -1].numpy()
    got = rows[0][-1]
    spread = want.max() - want.min()
    err = np.abs(got - want).max() / spread
    print(f"{scheme} {model_type}: first-token logits max error {err:.2e} of their spread {spread:.2f}")
    assert err <= LOGIT_TOL[scheme] and first == stream.tokens[:1]
    if scheme == "int4":
        assert first[0] == int(want.argmax())


def _train(bundle, data, out):
    args = ["train", bundle, "--data", data, "--out", out, "--max-steps", 20, "--lr", 3e-3, "--no-progress"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    return out / "adapter"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_lowers_loss_like_fp32(factory, tmp_path, scheme):
    data = _data(tmp_path)
    path = factory.bundle("llama", quantize=scheme)
    before = _eval(path, data)
    trained = _eval(path, data, _train(path, data, tmp_path / "run"))
    ref_path = factory.bundle("llama")
    ref = _eval(ref_path, data, _train(ref_path, data, tmp_path / "run-fp32"))
    assert trained < before - 0.2, (before, trained)
    assert abs(trained - ref) / ref <= TRAIN_GAP, (trained, ref)


def test_prepacked_int4_trains_the_same_and_auto_needs_room(factory, tmp_path, monkeypatch):
    """--prepack: MatMulNBits with its packed layout gives the unpacked run's losses and adapter
    (fp32 compute: the same products, another summation order); auto pre-packs only when the
    planner's estimate plus the packed copy fits the budget; float32 bundles never pre-pack."""
    from dataclasses import replace

    from safetensors.numpy import load_file

    from edgeft.device import train as train_module
    from edgeft.device.planner import plan

    path = factory.bundle("llama", quantize="int4")
    data = DATA / "train.jsonl"
    runs = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        args = ["train", path, "--data", data, "--out", out, "--max-steps", 3, "--no-progress", "--prepack", mode]
        assert _run(*args).exit_code == 0
        runs[mode] = (
            json.loads((out / "summary.json").read_text()),
            load_file(str(out / "adapter" / "adapter_model.safetensors")),
        )
    assert runs["off"][0]["prepack"] is False and runs["on"][0]["prepack"] is True
    np.testing.assert_allclose(runs["on"][0]["losses"], runs["off"][0]["losses"], rtol=1e-5)
    for name, want in runs["off"][1].items():
        np.testing.assert_allclose(runs["on"][1][name], want, rtol=1e-4, atol=1e-6)

    real = plan(Bundle.open(path), 4, 128)
    # the packed layouts in place of the unpacked calls' float32 temporary: a tiny model's head outweighs them
    assert real.train_prepack_mb != 0 and plan(Bundle.open(factory.bundle("llama")), 4, 128).train_prepack_mb == 0
    monkeypatch.setattr(
        train_module, "plan", lambda *a, **k: replace(real, train_peak_mb=500.0, train_prepack_mb=300.0)
    )
    for budget, expected in ((900, True), (700, False)):
        out = tmp_path / f"auto-{budget}"
        args = ["train", path, "--data", data, "--out", out, "--max-steps", 1, "--no-progress"]
        assert _run(*args, "--memory-budget", budget, "--recompute", "none").exit_code == 0
        assert json.loads((out / "summary.json").read_text())["prepack"] is expected
    # packed layouts that need less than the unpacked run: auto takes them, and the memory check
    # admits a run that fits only with them
    monkeypatch.setattr(
        train_module, "plan", lambda *a, **k: replace(real, train_peak_mb=500.0, train_prepack_mb=-100.0)
    )
    out = tmp_path / "auto-smaller"
    args = ["train", path, "--data", data, "--out", out, "--max-steps", 1, "--no-progress", "--recompute", "none"]
    assert _run(*args, "--memory-budget", 450).exit_code == 0
    assert json.loads((out / "summary.json").read_text())["prepack"] is True
    assert _run(*args, "--memory-budget", 450, "--prepack", "off").exit_code != 0
    fp32 = factory.bundle("llama")
    out = tmp_path / "fp32"
    assert (
        _run(
            "train", fp32, "--data", data, "--out", out, "--max-steps", 1, "--no-progress", "--prepack", "on"
        ).exit_code
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["prepack"] is False


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads Linux's /proc/self/smaps")
def test_prepacking_drops_the_mapped_int4_pages(factory, monkeypatch):
    """A pre-packing session reads every int4 weight once into MLAS's layout: the weights file's
    mapped pages are dropped as it does (without that they would stay resident beside the layout)."""
    import contextlib

    from edgeft.device.runtime import LoraGraphs, graph_session
    from edgeft.device.weights import BundleWeights

    bundle = Bundle.open(factory.bundle("llama", quantize="int4"))
    weights = bundle.path(bundle.manifest["weights"])
    resident = {}
    for shed in (True, False):
        if not shed:
            monkeypatch.setattr(BundleWeights, "shedding", lambda self: contextlib.nullcontext())
        graphs = LoraGraphs(bundle, graph_session(prepack=True))
        graphs._training  # noqa: B018 - the session, pre-packing its weights
        resident[shed] = _resident_kb(weights)
        del graphs
    assert resident[False] >= 0.5 * weights.stat().st_size / 1024 and resident[True] <= 8, resident


def _resident_kb(path: Path) -> int:
    """Resident KB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_int4_block_size_option(factory, tmp_path):
    path = tmp_path / "b64"
    result = _run("export", factory.model("llama"), "--out", path, "--quantize", "int4", "--quant-block-size", 64)
    assert result.exit_code == 0, result.output
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["quantization"]["block_size"] == 64
    from safetensors import safe_open

    with safe_open(str(path / "weights.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [64, 2, 32]  # [N, K / 64, 32]
    assert abs(_eval(path, _data(tmp_path, 8)) - _eval(factory.bundle("llama"), _data(tmp_path, 8))) < 0.1


@pytest.mark.parametrize("scheme", SCHEMES)
def test_trained_adapter_generates_and_loads_in_peft(factory, tmp_path, scheme):
    import torch
    from helpers import torch_peft_model

    from edgeft.device.generate import GenerateConfig, generate

    data = _data(tmp_path, 16)
    path = factory.bundle("llama", quantize=scheme)
    adapter = _train(path, data, tmp_path / "run")
    text = generate(GenerateConfig(path, PROMPT, adapter=adapter, max_new_tokens=12), io.StringIO())
    assert len(text) >= 12  # 12 new tokens, at least a byte each (no early stop on this prompt)
    # The adapter is a plain PEFT LoRA adapter: it loads against the fp32 base with the fp32
    # bundle's logits, and its loss there is close to the quantized bundle's.
    from helpers import first_batch, ort_logits, scored_positions

    from edgeft.bundle import Bundle
    from edgeft.device.adapter import load_adapter

    fp32 = factory.bundle("llama")
    batch = first_batch(fp32, data)
    model = torch_peft_model(factory.model("llama"), adapter)
    with torch.no_grad():
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        peft_logits = model(input_ids=ids, attention_mask=mask).logits.numpy()[scored_positions(batch)]
    np.testing.assert_allclose(
        ort_logits(fp32, load_adapter(adapter, Bundle.open(fp32)), batch), peft_logits, atol=1e-4
    )
    assert abs(_eval(factory.bundle("llama"), data, adapter) - _eval(path, data, adapter)) <= EVAL_TOL[scheme]
    venv = os.environ.get("EDGEFT_DEVICE_VENV")
    if venv:  # plain onnxruntime (no training build) serves the quantized bundle with the same tokens
        plain = subprocess.run(
            [
                str(Path(venv) / "bin" / "edgeft"),
                "generate",
                str(path),
                "--prompt",
                PROMPT,
                "--adapter",
                str(adapter),
                "--max-new-tokens",
                "12",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout == text + "\n"


def test_option_errors(factory, tmp_path):
    model = factory.model("llama")
    result = _run("export", model, "--out", tmp_path / "b", "--quantize", "int3")
    assert result.exit_code == 2 and "Invalid value for '--quantize'" in result.output
    result = _run("export", model, "--out", tmp_path / "b", "--quantize", "int4", "--quant-block-size", 48)
    assert result.exit_code == 2 and "Invalid value for '--quant-block-size'" in result.output
    result = _run("export", model, "--out", tmp_path / "b", "--dora", "--quantize", "int8")
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--dora" in lines[0] and "--quantize" in lines[0]
    assert not (tmp_path / "b").exists()


def test_devices_refuse_what_they_cannot_read(factory, tmp_path):
    import shutil

    import jsonschema

    from edgeft.bundle import SCHEMA_PATH

    path = factory.bundle("llama", quantize="int8")
    manifest = json.loads((path / "manifest.json").read_text())
    # A device from before quantization validates against the schema without `quantized`: it refuses.
    old = json.loads(SCHEMA_PATH.read_text())
    del old["properties"]["parameters"]["items"]["properties"]["quantized"]
    errors = list(jsonschema.Draft202012Validator(old).iter_errors(manifest))
    assert errors and "'quantized' was unexpected" in errors[0].message
    # An unknown scheme is refused with one line by this device.
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    manifest["quantization"]["scheme"] = "nf4"
    for p in manifest["parameters"]:
        if "quantized" in p:
            p["quantized"]["scheme"] = "nf4"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = _run("eval", copy, "--data", _data(tmp_path, 4))
    assert result.exit_code == 2 and "nf4" in result.output and "not support" in result.output
    # Merge needs float base weights.
    result = _run("merge", path, "--adapter", path / "adapter", "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "--quantize" in result.output and not (tmp_path / "merged").exists()
