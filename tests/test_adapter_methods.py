"""DoRA, rsLoRA and per-module rank/alpha patterns: export, eval, training, serving and merge vs torch + PEFT.

Tolerances (tiny models, fp32, CPU):
- eval loss and logits vs torch + PEFT: <= 1e-4 (measured ~1e-6 relative).
- 3 AdamW steps vs torch.optim.AdamW: max |Δ| <= 1e-6 on every trainable tensor (LoRA A/B and the
  DoRA magnitude; measured ~1e-7). This holds for DoRA only because the export stops the gradient
  through the weight norm as PEFT's ``detach`` does (``edgeft.host.export.dora_for_onnx``); without
  it ORT differentiates through the norm and the gradients differ by ~8% (measured 0.064 for a max
  gradient of 0.76).
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, MODEL_TYPES
from helpers import (
    edgeft_training,
    make_peft_adapter,
    ort_logits,
    scored_positions,
    torch_loss_sum,
    torch_peft_model,
    torch_reference_training,
)

from edgeft.bundle import Bundle
from edgeft.cli import main
from edgeft.device.adapter import load_adapter
from edgeft.models import default_lora_targets

METHODS = ["dora", "rslora"]


def _bundle_options(method: str, model_type: str) -> dict:
    targets = default_lora_targets(model_type)
    if method == "dora":
        return dict(use_dora=True)
    return dict(use_rslora=True, rank_pattern={targets[0]: 4}, alpha_pattern={targets[-1]: 32})


def _adapter_options(method: str, model_type: str) -> dict:
    """A PEFT config that fits the bundle of ``method`` (same ranks) with other alphas per module."""
    targets = default_lora_targets(model_type)
    if method == "dora":
        return dict(use_dora=True, alpha=24)
    return dict(use_rslora=True, alpha=24, rank_pattern={targets[0]: 4}, alpha_pattern={targets[0]: 12})


def _adapter(factory, tmp_path, method, model_type, name="peft", b_std=0.05, **extra):
    options = {**_adapter_options(method, model_type), **extra}
    targets = default_lora_targets(model_type)
    return make_peft_adapter(factory.model(model_type), tmp_path / name, targets=targets, b_std=b_std, **options)


def _data(tmp_path, lines: int = 6):
    path = tmp_path / "data.jsonl"
    path.write_text("".join((DATA / "train.jsonl").open().readlines()[:lines]))
    return path


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _torch_mean_loss(model, bundle, data) -> float:
    import torch

    from edgeft.device.data import load_examples, make_batches
    from edgeft.device.tokenizer import BundleTokenizer

    tok = BundleTokenizer.from_dir(bundle)
    examples = load_examples(data, tok, 128)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in make_batches(examples, 8, tok.pad_token_id, seed=0, epoch=0):
            total += torch_loss_sum(model, batch).item()
            tokens += batch.num_loss_tokens
    return total / tokens


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("method", METHODS)
def test_eval_matches_torch_peft(factory, tmp_path, method, model_type):
    """A PEFT-made DoRA / rsLoRA+pattern adapter with other alphas, through `edgeft eval --adapter`."""
    path = factory.bundle(model_type, **_bundle_options(method, model_type))
    manifest = json.loads((path / "manifest.json").read_text())
    adapter = _adapter(factory, tmp_path, method, model_type)
    data = _data(tmp_path)
    result = _run("eval", path, "--data", data, "--adapter", adapter)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])["loss"]
    model = torch_peft_model(factory.model(model_type), adapter)
    ref = _torch_mean_loss(model, path, data)
    with model.disable_adapter():
        base = _torch_mean_loss(model, path, data)
    assert abs(ref - base) > 1e-3  # the adapter really changes the loss
    assert abs(got - ref) <= 1e-4, (got, ref)
    # the manifest records each module's scaling: PEFT's alpha / r, or alpha / sqrt(r) per pattern
    targets = default_lora_targets(model_type)
    for module, scaling in manifest["lora"]["scaling"].items():
        if method == "dora":
            expected = 16 / 8
        else:
            expected = {targets[0]: 16 / 4**0.5, targets[-1]: 32 / 8**0.5}.get(module.rsplit(".", 1)[1], 16 / 8**0.5)
        assert scaling == pytest.approx(expected, rel=1e-12), module
    modules = {p["key"].split(".lora_")[0] for p in manifest["parameters"] if p["trainable"]}
    assert set(manifest["lora"]["scaling"]) == modules
    assert manifest["lora"]["use_dora"] is (method == "dora")
    assert manifest["lora"]["use_rslora"] is (method == "rslora")


@pytest.mark.parametrize(("method", "model_type"), [("dora", "llama"), ("dora", "phi3"), ("rslora", "llama")])
def test_training_steps_match_torch_adamw_and_round_trip(factory, tmp_path, method, model_type):
    """--init-adapter with a DoRA / rsLoRA+pattern adapter (its config wins), 3 optimizer steps
    (grad accumulation 2, warm-up, decay, clipping) vs torch AdamW (max |Δ| <= 1e-6), then the
    trained adapter loads in PeftModel.from_pretrained with the bundle's logits (<= 1e-4)."""
    import torch
    from safetensors.numpy import load_file

    model_dir = factory.model(model_type)
    start = _adapter(factory, tmp_path, method, model_type, name="start")
    path = factory.bundle(model_type, init_adapter=start)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["lora"]["use_dora"] is (method == "dora")
    assert manifest["lora"]["lora_alpha"] == 24  # the adapter's config won
    data = _data(tmp_path)
    got = edgeft_training(path, data, tmp_path / "run")

    ref = torch_reference_training(model_dir, path, data)
    assert set(got) == set(ref)
    assert any(k.endswith("lora_magnitude_vector") for k in ref) is (method == "dora")
    start_w = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    moved = max(float(np.abs(ref[k] - start_w[k]).max()) for k in ref)
    assert moved > 1e-3  # training really changed the weights
    diff = max(float(np.abs(got[k] - ref[k]).max()) for k in ref)
    assert diff <= 1e-6, f"max |ORT - torch| = {diff}"

    # round trip: edgeft's trained adapter in PEFT gives the bundle's logits
    from helpers import first_batch

    batch = first_batch(path, DATA / "train.jsonl")
    ours = ort_logits(path, load_adapter(tmp_path / "run" / "adapter", Bundle.open(path)), batch)
    with torch.no_grad():
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        peft_logits = torch_peft_model(model_dir, tmp_path / "run" / "adapter")(input_ids=ids, attention_mask=mask)
    scored = scored_positions(batch)
    np.testing.assert_allclose(ours, peft_logits.logits.numpy()[scored], atol=1e-4, rtol=0)


def test_dora_training_lowers_the_loss(factory, tmp_path):
    import onnx

    from edgeft.device.train import TrainConfig, train

    path = factory.bundle("llama", **_bundle_options("dora", "llama"))
    graph = onnx.load(str(path / "training_model.onnx"), load_external_data=False).graph
    assert "ReduceL2" not in {n.op_type for n in graph.node}  # ORT 1.19's ReduceL2 gradient is invalid
    data = _data(tmp_path, 8)
    cfg = TrainConfig(path, data, tmp_path / "run", eval_data=data, max_steps=6, lr=1e-2, batch_size=4, progress=False)
    summary = train(cfg)
    assert summary["eval_loss"] < summary["eval_loss_before"] - 0.1, summary
    trained = load_adapter(tmp_path / "run" / "adapter", Bundle.open(path))
    initial = load_adapter(path / "adapter", Bundle.open(path))
    magnitudes = [n for n in trained if ".lora_magnitude_vector." in n]
    assert magnitudes and any(not np.array_equal(trained[n], initial[n]) for n in magnitudes)


def test_greedy_generate_with_dora_equals_transformers(factory, tmp_path, monkeypatch):
    """32 greedy tokens from decoder_lora.onnx (magnitude as an input) == PEFT model.generate."""
    import torch
    from peft.tuners.lora import dora

    monkeypatch.setattr(dora, "ENABLE_DORA_CACHING", True)  # eval-mode cache of B @ A and the norm: same values

    from edgeft.device.decoder import BASE, Sampling
    from edgeft.device.generate import TextGenerator

    path = factory.bundle("llama", **_bundle_options("dora", "llama"))
    adapter = _adapter(factory, tmp_path, "dora", "llama", b_std=0.3)
    gen = TextGenerator(path)
    assert any(".lora_magnitude_vector." in n for n in gen.decoder.lora_inputs)
    gen.decoder.add_adapter("dora", adapter)
    prompt = gen.encode("Station north ridge: pump is worn. What should the crew do?")
    model = torch_peft_model(factory.model("llama"), adapter)
    outputs = {}
    for name in ("dora", BASE):
        stream = gen.stream(prompt, name, Sampling(max_new_tokens=32))
        list(stream)
        with torch.no_grad(), model.disable_adapter() if name == BASE else contextlib.nullcontext():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        ref = out[0, len(prompt) :].tolist()
        if stream.finish_reason == "stop":
            ref = ref[:-1]
        assert stream.tokens == ref, name
        outputs[name] = ref
    assert len(outputs["dora"]) > 4 and outputs["dora"] != outputs[BASE]  # the adapter matters


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_peft_merge_and_unload(factory, tmp_path, method):
    import onnxruntime as ort
    import torch

    from edgeft.device.merge import MergeConfig, merge

    path = factory.bundle("llama", **_bundle_options(method, "llama"))
    adapter = _adapter(factory, tmp_path, method, "llama", b_std=0.3)
    out = merge(MergeConfig(path, adapter, tmp_path / "merged"))
    config = json.loads((path / "config.json").read_text())
    ids = np.array([[1, 40, 41, 42, 43, 44, 45, 46]], np.int64)
    heads = config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for i in range(config["num_hidden_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, heads, 0, head_dim), np.float32)
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        peft_model = torch_peft_model(factory.model("llama"), adapter)
        unmerged = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
        ref = peft_model.merge_and_unload()(input_ids=torch.from_numpy(ids)).logits.numpy()
        base = torch_peft_model(factory.model("llama"), path / "adapter").merge_and_unload()
        base = base(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ref - base).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, unmerged, atol=1e-4, rtol=0)


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_dora_and_plain_adapters_do_not_cross(factory, tmp_path):
    data = _data(tmp_path, 2)
    dora_adapter = _adapter(factory, tmp_path, "dora", "llama", name="dora")
    plain = make_peft_adapter(factory.model("llama"), tmp_path / "plain", targets=["q_proj"])
    result = _run("eval", factory.bundle("llama"), "--data", data, "--adapter", dora_adapter)
    _one_line_error(result, "adapter_config.json", "use_dora", "exported without --dora")
    result = _run(
        "eval", factory.bundle("llama", **_bundle_options("dora", "llama")), "--data", data, "--adapter", plain
    )
    _one_line_error(result, "adapter_config.json", "DoRA bundle")


def test_export_option_errors(factory, tmp_path):
    model = factory.model("llama")
    out = tmp_path / "bundle"
    cases = [
        (["--rank-pattern", '{"nope_proj": 4}'], ["--rank-pattern", "nope_proj", "matches no LoRA module"]),
        (["--alpha-pattern", '{"q_proj": 8, "mlp": 2}'], ["--alpha-pattern", "'mlp'", "matches no LoRA module"]),
        (["--rank-pattern", "q_proj=4"], ["--rank-pattern", "invalid JSON"]),
        (["--rank-pattern", "[4]"], ["--rank-pattern", "JSON object"]),
        (["--rank-pattern", '{"q_proj": 0}'], ["--rank-pattern", "positive integers"]),
        (["--alpha-pattern", '{"q_proj": "big"}'], ["--alpha-pattern", "positive numbers"]),
    ]
    for args, needles in cases:
        _one_line_error(_run("export", model, "--out", out, *args), *needles)
        assert not out.exists() and not list(tmp_path.glob(".bundle.*"))


def test_dora_with_quantize_is_refused(factory, tmp_path):
    from dataclasses import fields

    from edgeft.host.export import ExportConfig

    if "quantize" not in {f.name for f in fields(ExportConfig)}:
        pytest.skip("export has no --quantize option yet")
    result = _run("export", factory.model("llama"), "--out", tmp_path / "b", "--dora", "--quantize", "int8")
    _one_line_error(result, "--dora", "--quantize")


def test_adapter_config_with_bad_patterns_is_refused(factory, tmp_path):
    adapter = _adapter(factory, tmp_path, "rslora", "llama")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {"q_proj": "four"}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    path = factory.bundle("llama", **_bundle_options("rslora", "llama"))
    _one_line_error(
        _run("eval", path, "--data", _data(tmp_path, 2), "--adapter", adapter), "adapter_config.json", "rank_pattern"
    )
