"""``edgeft merge``: a LoRA adapter fused into the base weights, served by optimum without edgeft.

The merged directory is loaded with plain ``ORTModelForCausalLM.from_pretrained(out_dir)`` (no
``file_name``/``use_cache``/``use_io_binding`` needed: ``model.onnx`` is optimum's standard name,
the graph has a KV cache and ``position_ids``) and checked against edgeft's own adapter serving
(same greedy tokens) and against PEFT's ``merge_and_unload`` in torch (same logits, <= 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import make_peft_adapter

from edgeft.cli import main
from edgeft.device.merge import MergeConfig, merge

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def merged(factory, tmp_path_factory):
    """{model_type: (model_dir, bundle, adapter, merged_dir)}, built on first use."""
    root = tmp_path_factory.mktemp("merge")
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            model_dir, bundle = factory.model(model_type), factory.bundle(model_type)
            targets = json.loads((bundle / "manifest.json").read_text())["lora"]["target_modules"]
            adapter = make_peft_adapter(model_dir, root / f"peft-{model_type}", targets=targets, b_std=0.3)
            out = merge(MergeConfig(bundle, adapter, root / f"merged-{model_type}"))
            cache[model_type] = (model_dir, bundle, adapter, out)
        return cache[model_type]

    return get


def _edgeft_tokens(bundle: Path, adapter: Path | None) -> list[int]:
    from edgeft.device.decoder import BASE, Sampling
    from edgeft.device.generate import TextGenerator

    gen = TextGenerator(bundle, provider="cpu")
    name = BASE
    if adapter is not None:
        gen.decoder.add_adapter("adapter", adapter)
        name = "adapter"
    stream = gen.stream(gen.encode(PROMPT), name, Sampling(max_new_tokens=32))
    list(stream)
    return stream.tokens


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_optimum_generates_what_edgeft_serves(merged, model_type):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    _, bundle, adapter, out = merged(model_type)
    assert (out / "model.onnx").read_bytes() == (bundle / "decoder.onnx").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "model.onnx",
            "weights.safetensors",
            "config.json",
            "generation_config.json",
            "genai_config.json",  # onnxruntime-genai loads the same directory (tests/test_genai.py)
            "model_genai.onnx",  # from the GroupQueryAttention decoder, which genai_config.json names
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind

    model = ORTModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(PROMPT, return_tensors="pt")
    # input_ids/attention_mask only: the tiny tokenizer also returns token_type_ids, which generate() refuses
    ids = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=32, do_sample=False)
    got = ids[0, enc.input_ids.shape[1] :].tolist()
    eos = {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}
    if got and got[-1] in eos:
        got = got[:-1]  # transformers keeps the stop token; edgeft's stream does not

    with_adapter = _edgeft_tokens(bundle, adapter)
    assert got == with_adapter
    assert len(got) > 4
    assert got != _edgeft_tokens(bundle, None)  # the adapter matters


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_logits_match_peft_merge_and_unload(merged, model_type):
    import torch
    from helpers import torch_peft_model
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model_dir, _, adapter, out = merged(model_type)
    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(PROMPT, return_tensors="pt")
    model = ORTModelForCausalLM.from_pretrained(out)
    got = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.numpy()
    reference = torch_peft_model(model_dir, adapter).merge_and_unload()
    with torch.no_grad():
        ref = reference(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_weights_keep_the_bundle_layout(merged):
    from safetensors.numpy import load_file

    _, bundle, _, out = merged("llama")
    raw = (bundle / "weights.safetensors").read_bytes()
    new = (out / "weights.safetensors").read_bytes()
    size = 8 + int.from_bytes(raw[:8], "little")
    assert new[:size] == raw[:size] and len(new) == len(raw)
    before, after = load_file(str(bundle / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed
    )


def _fake_adapter(path: Path, key: str, shape: tuple[int, ...]) -> Path:
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    save_file({key: np.zeros(shape, np.float32)}, str(path / "adapter_model.safetensors"))
    return path


def _run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_adapter_that_does_not_fit_exits_2_and_writes_nothing(llama_bundle, tmp_path):
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"  # not a LoRA module of the bundle
    adapter = _fake_adapter(tmp_path / "bad", key, (8, 64))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "merged"
    result = _run("merge", llama_bundle, "--adapter", adapter, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "adapter_model.safetensors" in lines[0]
    assert not any(out.parent.iterdir())  # neither --out nor a staging directory

    wrong_r = _fake_adapter(tmp_path / "r4", key.replace("mlp.gate_proj", "self_attn.q_proj"), (4, 64))
    result = _run("merge", llama_bundle, "--adapter", wrong_r, "--out", out)
    assert result.exit_code == 2 and "shape" in result.output
    assert not any(out.parent.iterdir())


def test_out_rules(llama_bundle, tmp_path):
    adapter = llama_bundle / "adapter"  # the bundle's own (B = 0) adapter merges to the base model
    out = tmp_path / "merged"
    out.mkdir()
    result = _run("merge", llama_bundle, "--adapter", adapter, "--out", out)
    assert result.exit_code == 2 and "--overwrite" in result.output and not any(out.iterdir())
    for bad in (llama_bundle, llama_bundle / "sub", llama_bundle.parent):
        result = _run("merge", llama_bundle, "--adapter", adapter, "--out", bad, "--overwrite")
        assert result.exit_code == 2 and "bundle directory" in result.output
    result = _run("merge", llama_bundle, "--adapter", adapter, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "weights.safetensors").read_bytes() == (llama_bundle / "weights.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_merge_needs_no_host_stack(merged, tmp_path):
    """Runs in a subprocess where torch, transformers, peft, optimum and onnx cannot be imported,
    with a non-zero PEFT adapter; the merged weights are W + alpha/r * B @ A, computed here from the
    adapter's own files, and the merged model's logits equal PEFT's merge_and_unload."""
    import torch
    from helpers import torch_peft_model
    from optimum.onnxruntime import ORTModelForCausalLM
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    model_dir, bundle, adapter, _ = merged("llama")
    code = (
        "import sys\n"
        "for m in ('torch', 'transformers', 'peft', 'optimum', 'onnx'): sys.modules[m] = None\n"
        "from edgeft.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    out = tmp_path / "merged"
    args = ["merge", str(bundle), "--adapter", str(adapter), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    base, got = load_file(str(bundle / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    expected = dict(base)
    for key in (k for k in lora if k.endswith(".lora_A.weight")):
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        expected[f"{module}.weight"] = base[f"{module}.weight"] + scale * (b @ lora[key])
    assert got.keys() == base.keys()
    changed = [k for k in base if not np.array_equal(got[k], base[k])]
    assert len(changed) == len(lora) // 2 > 0  # every targeted weight moved, nothing else
    for key in base:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, rtol=0, err_msg=key)

    tokenizer = AutoTokenizer.from_pretrained(out)
    enc = tokenizer(PROMPT, return_tensors="pt")
    logits = ORTModelForCausalLM.from_pretrained(out)(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    reference = torch_peft_model(model_dir, adapter).merge_and_unload()
    with torch.no_grad():
        ref = reference(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.numpy()
    np.testing.assert_allclose(logits.logits.numpy(), ref, atol=1e-4, rtol=0)
