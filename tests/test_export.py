"""Export: the bundle's exact file set, manifest content, base weights stored once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MODEL_TYPES
from helpers import make_peft_adapter

from edgeft.bundle import Bundle, file_table
from edgeft.fsutil import sha256_file

BUNDLE_FILES = {
    "manifest.json",
    "training_model.onnx",
    "training_recompute.onnx",
    "eval_model.onnx",
    "decoder_lora.onnx",
    "decoder.onnx",
    "weights.safetensors",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "config.json",
    "generation_config.json",
}


def test_bundle_file_set_and_manifest(llama_bundle):
    files = {p.relative_to(llama_bundle).as_posix() for p in llama_bundle.rglob("*") if p.is_file()}
    assert files == BUNDLE_FILES
    manifest = json.loads((llama_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["model_type"] == "llama"
    assert manifest["max_seq_len"] == 128
    assert manifest["lora"]["r"] == 8 and manifest["lora"]["lora_alpha"] == 16
    assert manifest["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    trainable = [p["onnx"] for p in manifest["parameters"] if p["trainable"]]
    data = ["input_ids", "attention_mask", "labels", "num_loss_tokens"]
    training, evaluation = manifest["graphs"]["training"], manifest["graphs"]["eval"]
    assert training["inputs"] == evaluation["inputs"] == data + trainable  # frozen weights are not inputs
    assert training["gradients"] == {n: f"{n}_grad" for n in trainable}
    assert training["outputs"] == ["loss", *training["gradients"].values()] and evaluation["outputs"] == ["loss"]
    recompute = manifest["graphs"]["training_recompute"]  # export --recompute auto (the default): both
    assert (training["recompute"], recompute["recompute"]) == (False, True)
    assert {k: recompute[k] for k in ("inputs", "outputs", "gradients")} == {
        k: training[k] for k in ("inputs", "outputs", "gradients")
    }
    assert set(manifest["files"]) == BUNDLE_FILES - {"manifest.json"}
    for rel, meta in manifest["files"].items():
        assert meta == {"sha256": sha256_file(llama_bundle / rel), "size": (llama_bundle / rel).stat().st_size}
    assert manifest["files"] == file_table(llama_bundle)
    Bundle.open(llama_bundle)  # validates against artifacts/manifest.schema.json


def test_parameter_mapping_matches_peft_keys(llama_bundle):
    from safetensors.numpy import load_file

    bundle = Bundle.open(llama_bundle)
    weights = load_file(str(llama_bundle / "weights.safetensors"))
    adapter = load_file(str(llama_bundle / "adapter" / "adapter_model.safetensors"))
    assert {p["key"] for p in bundle.frozen} == set(weights)
    assert {p["key"] for p in bundle.trainable} == set(adapter)
    for p in bundle.trainable:
        assert p["onnx"].replace(".default.", ".") == p["key"]
        assert list(adapter[p["key"]].shape) == p["shape"]
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert np.count_nonzero(adapter[q_b]) == 0  # PEFT's init: B = 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_trainable_count_equals_peft(factory, model_type):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edgeft.models import default_lora_targets

    bundle = Bundle.open(factory.bundle(model_type))
    model = AutoModelForCausalLM.from_pretrained(factory.model(model_type), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=default_lora_targets(model_type), task_type="CAUSAL_LM")
    trainable, _ = get_peft_model(model, config).get_nb_trainable_parameters()
    assert bundle.manifest["lora"]["trainable_parameters"] == trainable
    assert sum(int(np.prod(p["shape"])) for p in bundle.trainable) == trainable


INLINE_LIMIT = 32  # elements: small constants (rotary inv_freq is 8 here) but no weight (norms have 64)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_base_weights_stored_once(factory, model_type):
    """No graph holds a weight (initializers or Constant nodes above a few dozen elements); every
    external tensor is a byte range of weights.safetensors, which holds each frozen weight exactly
    once (tied embeddings once) and nothing else."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    from edgeft.bundle import read_safetensors_header, safetensors_ranges

    path = factory.bundle(model_type)
    ranges = safetensors_ranges(path / "weights.safetensors")
    for graph in ("training_model.onnx", "eval_model.onnx", "decoder_lora.onnx", "decoder.onnx"):
        model = onnx.load(str(path / graph), load_external_data=False)
        inline = [
            (i.name, list(i.dims)) for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL
        ]
        inline += [(n.name, list(a.t.dims)) for n in model.graph.node for a in n.attribute if a.name == "value"]
        big = [(name, dims) for name, dims in inline if np.prod(dims) > INLINE_LIMIT]
        assert big == [], f"{graph} embeds tensors {big[:3]}"
        external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
        assert external, graph
        for init in external:
            ext = {e.key: e.value for e in init.external_data}
            assert ext["location"] == "weights.safetensors"
            assert (int(ext["offset"]), int(ext["length"])) in set(ranges.values())
            assert int(ext["length"]) == 4 * int(np.prod(init.dims))
    model = AutoModelForCausalLM.from_pretrained(factory.model(model_type), dtype=torch.float32)
    frozen = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters()}  # tied weights once
    raw, header = read_safetensors_header(path / "weights.safetensors")
    assert set(header) - {"__metadata__"} == set(frozen)
    assert (path / "weights.safetensors").stat().st_size == len(raw) + sum(4 * p.numel() for p in frozen.values())


def test_init_adapter_config_wins(factory, tmp_path):
    from safetensors.numpy import load_file

    model_dir = factory.model("llama")
    adapter = make_peft_adapter(model_dir, tmp_path / "peft", r=4, alpha=8, targets=["q_proj", "v_proj"])
    bundle = Bundle.open(factory.bundle("llama", init_adapter=adapter, lora_r=16))
    lora = bundle.manifest["lora"]
    assert (lora["r"], lora["lora_alpha"], lora["target_modules"]) == (4, 8, ["q_proj", "v_proj"])
    src = load_file(str(adapter / "adapter_model.safetensors"))
    got = load_file(str(bundle.root / "adapter" / "adapter_model.safetensors"))
    assert set(src) == set(got)
    for key in src:
        np.testing.assert_array_equal(src[key], got[key])
