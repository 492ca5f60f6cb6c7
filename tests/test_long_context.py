"""Every model type beyond its attention window and rope switch point.

The tiny models (edgeft/host/tiny.py FEATURES) have 16-token sliding windows (mistral and phi3 on
every layer, qwen2 on its upper layer, gemma3 on its local layers) and a longrope switch at 32
tokens (phi3); the batches and prompts here run to 40-90 tokens. Eval loss and raw LoRA gradients vs
torch + PEFT, greedy tokens vs transformers generate with and without its cache. Each case also
proves that its feature changes the reference at these lengths: a parity test that would pass
with the window or the rope variant switched off proves nothing.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import DATA, MODEL_TYPES
from helpers import (
    make_peft_adapter,
    max_relative_error,
    torch_lora_grads,
    torch_loss_sum,
    torch_model_like_bundle,
    torch_peft_model,
)

from edgeft.bundle import Bundle
from edgeft.device.adapter import load_adapter
from edgeft.device.data import load_examples, make_batches
from edgeft.device.decoder import Sampling
from edgeft.device.generate import TextGenerator
from edgeft.device.runtime import LoraGraphs
from edgeft.device.tokenizer import BundleTokenizer

WINDOW, SWITCH = 16, 32  # the tiny models' sliding window and longrope switch (tiny.py FEATURES)
GRAD_TOL = 1e-4  # as tests/test_parity.py
LOSS_TOL = 1e-4  # eval loss vs torch + PEFT (measured <= 1e-6)
# Switching a feature off must move the torch reference by more than 3x LOSS_TOL, so a graph that
# ignored it would fail the parity check (measured effects: see the README's table).
FEATURE_EFFECT = 3 * LOSS_TOL
_SHORT = {"short_factor": "long_factor", "long_factor": "short_factor"}


def _longrope_without(config: dict, side: str) -> dict:
    """phi3's rope_scaling with the factors of ``side`` replaced by the other side's."""
    scaling = dict(config["rope_scaling"])
    scaling[side] = scaling[_SHORT[side]]
    return {"rope_scaling": scaling}


def _all_layers(kind: str):
    return lambda c: {"layer_types": [kind] * c["num_hidden_layers"]}


# Config overrides that switch each of a type's features off, or apply one window to every layer
# (what edgeft did before per-layer masks); the torch reference must then change.
WITHOUT = {
    "llama": [lambda c: {"rope_scaling": None}],  # llama3 scaling
    "mistral": [lambda c: {"sliding_window": None}],
    "qwen2": [_all_layers("full_attention"), _all_layers("sliding_attention")],
    "phi3": [lambda c: _longrope_without(c, "long_factor"), lambda c: {"sliding_window": None}],
    "qwen3": [lambda c: {"rope_scaling": None}],  # yarn
    "gemma3_text": [_all_layers("full_attention"), _all_layers("sliding_attention")],
}


@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Text samples of 8-60 words: 13-89 tokens with the tiny tokenizer, the shortest inside a window."""
    words = (DATA / "corpus.txt").read_text().split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(n))}) for n in (30, 45, 8, 60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _batch(bundle, data, lines=None, max_len=128):
    tok = BundleTokenizer.from_dir(bundle)
    examples = load_examples(data, tok, max_len, truncate=True)
    if lines is not None:
        examples = [examples[i] for i in lines]
    return make_batches(examples, 4, tok.pad_token_id, seed=0, epoch=0)[0]


def _torch_loss(model_dir, adapter, batch, **overrides) -> float:
    import torch

    with torch.no_grad():
        model = torch_peft_model(model_dir, adapter, **overrides)
        return torch_loss_sum(model, batch).item() / batch.num_loss_tokens


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_long_batch_loss_and_gradients_match_torch_peft(factory, tmp_path, long_data, model_type):
    model_dir, path = factory.model(model_type), factory.bundle(model_type)
    bundle = Bundle.open(path)
    adapter = make_peft_adapter(model_dir, tmp_path / "peft", targets=bundle.manifest["lora"]["target_modules"])
    batch = _batch(path, long_data)
    lengths = batch.attention_mask.sum(axis=1)
    assert lengths.max() > SWITCH + WINDOW and lengths.min() < WINDOW  # beyond every window; padding too
    n = float(batch.num_loss_tokens)
    lora = load_adapter(adapter, bundle)
    ref = _torch_loss(model_dir, adapter, batch)
    assert abs(LoraGraphs(bundle).loss(lora, batch, n) - ref) <= LOSS_TOL
    loss, grads = LoraGraphs(bundle).loss_and_grads(lora, batch, n)
    ref_loss, ref_grads = torch_lora_grads(torch_model_like_bundle(model_dir, path, adapter), batch, n)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, want in ref_grads.items():
        assert max_relative_error(grads[name], want) <= GRAD_TOL, name
    config = json.loads((model_dir / "config.json").read_text())
    for without in WITHOUT[model_type]:
        overrides = without(config)
        effect = abs(_torch_loss(model_dir, adapter, batch, **overrides) - ref)
        # or the gradients: a graph without the feature fails the loss check or the gradient check
        changed = torch_lora_grads(torch_peft_model(model_dir, adapter, trainable=True, **overrides), batch, n)[1]
        grad_effect = max(max_relative_error(changed[k], want) for k, want in ref_grads.items())
        print(f"{model_type}: changing {overrides} moves the loss by {effect:.2e}, the grads by {grad_effect:.2e}")
        assert effect > FEATURE_EFFECT or grad_effect > 3 * GRAD_TOL, overrides


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_long_prompt_greedy_equals_transformers(factory, tmp_path, long_data, model_type):
    """A prompt longer than the window and the rope switch, then 24 tokens: transformers generate
    with its cache (gemma3 and windowed qwen2/mistral keep sliding-window caches there) and
    without one give the same tokens, and edgeft gives them too."""
    import torch

    path = factory.bundle(model_type)
    targets = Bundle.open(path).manifest["lora"]["target_modules"]
    adapter = make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets, b_std=0.3)
    gen = TextGenerator(path)
    gen.decoder.add_adapter("a", adapter)
    text = json.loads(long_data.read_text().splitlines()[1])["text"]
    prompt = gen.encode(text)[: SWITCH + WINDOW]
    assert len(prompt) > SWITCH + 1
    # No stop tokens on either side: all 24 tokens are compared whatever the adapter makes likely.
    got = list(gen.decoder.generate_ids(prompt, "a", Sampling(max_new_tokens=24), stop_ids=set()))
    model = torch_peft_model(factory.model(model_type), adapter)
    for use_cache in (True, False):
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                max_new_tokens=24,
                do_sample=False,
                use_cache=use_cache,
                eos_token_id=None,
            )
        assert got == out[0, len(prompt) :].tolist(), f"use_cache={use_cache}"
    assert len(got) == 24


GQA_PROBE = """
import json, sys
from edgeft.device.decoder import Sampling
from edgeft.device.generate import TextGenerator
gen = TextGenerator(sys.argv[1])
gen.decoder.add_adapter("a", sys.argv[2])
prompt = json.loads(sys.argv[3])
tokens = list(gen.decoder.generate_ids(prompt, "a", Sampling(max_new_tokens=24), stop_ids=set()))
print(json.dumps({"tokens": tokens, "shared_kv": gen.decoder.shared_kv}))
"""


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_long_prompt_on_the_newest_onnxruntime(factory, tmp_path, long_data, model_type):
    """The device venv's newest onnxruntime runs the GroupQueryAttention decoder (its sliding
    window counts the current token from 1.23 on); the host's 1.19 runs the eager twin of a
    windowed model. Beyond the window both give transformers' tokens (the test above: host)."""
    import os
    import subprocess

    venv = os.environ.get("EDGEFT_DEVICE_VENV")
    if not venv:
        pytest.skip("EDGEFT_DEVICE_VENV not set (make test sets it)")
    path = factory.bundle(model_type)
    graphs = Bundle.open(path).manifest["graphs"]
    targets = Bundle.open(path).manifest["lora"]["target_modules"]
    adapter = make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets, b_std=0.3)
    gen = TextGenerator(path)
    gen.decoder.add_adapter("a", adapter)
    prompt = gen.encode(json.loads(long_data.read_text().splitlines()[1])["text"])[: SWITCH + WINDOW]
    host = list(gen.decoder.generate_ids(prompt, "a", Sampling(max_new_tokens=24), stop_ids=set()))
    python = str(Path(venv) / "bin" / "python")
    run = subprocess.run(
        [python, "-c", GQA_PROBE, str(path), str(adapter), json.dumps(prompt)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    device = json.loads(run.stdout.strip().splitlines()[-1])
    assert graphs["decoder_lora"].get("kv_cache") == "shared" and device["shared_kv"]
    assert gen.decoder.shared_kv is ("decoder_lora_eager" not in graphs)  # host 1.19: the eager twin if windowed
    # the tiny llama and qwen3 have neither a window nor gemma's attention softcap
    assert ("decoder_lora_eager" in graphs) is (model_type not in ("llama", "qwen3"))
    assert device["tokens"] == host


def test_longrope_on_both_sides_of_the_switch(factory, tmp_path, long_data):
    """phi3: a batch of at most 32 tokens takes the short factors, a longer one the long factors
    (transformers decides per forward from max(position_ids) + 1); the graph matches both."""
    model_dir, path = factory.model("phi3"), factory.bundle("phi3")
    bundle = Bundle.open(path)
    adapter = make_peft_adapter(model_dir, tmp_path / "peft", targets=bundle.manifest["lora"]["target_modules"])
    lora = load_adapter(adapter, bundle)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["original_max_position_embeddings"] == SWITCH
    short = _batch(path, long_data, lines=[1, 2], max_len=SWITCH)  # 32 and 15 tokens
    long = _batch(path, long_data, lines=[1, 2])
    assert short.input_ids.shape[1] == SWITCH < long.input_ids.shape[1]
    for batch, side in ((short, "short_factor"), (long, "long_factor")):
        ref = _torch_loss(model_dir, adapter, batch)
        got = LoraGraphs(bundle).loss(lora, batch, float(batch.num_loss_tokens))
        assert abs(got - ref) <= LOSS_TOL, side
        effect = abs(_torch_loss(model_dir, adapter, batch, **_longrope_without(config, side)) - ref)
        print(f"phi3 {side}: loss {ref:.6f}, the other factors move it by {effect:.2e}")
        assert effect > FEATURE_EFFECT, side
