"""Serving core: greedy decoding equals transformers' generate; adapters switch in one session."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import MODEL_TYPES
from helpers import make_peft_adapter, torch_peft_model

from edgeft.device.decoder import BASE, Decoder, Sampling
from edgeft.device.generate import GenerateConfig, TextGenerator, generate

PROMPT = "Station north ridge: pump is worn. What should the crew do?"
TARGETS = {"phi3": ["qkv_proj", "o_proj"]}


def _adapter(factory, tmp_path, model_type, b_std=0.3, seed=1):
    targets = TARGETS.get(model_type, ["q_proj", "k_proj", "v_proj", "o_proj"])
    return make_peft_adapter(
        factory.model(model_type), tmp_path / f"adapter-{seed}", targets=targets, b_std=b_std, seed=seed
    )


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_equals_transformers_generate(factory, tmp_path, model_type, with_adapter):
    import torch
    from transformers import AutoTokenizer

    path = factory.bundle(model_type)
    adapter = _adapter(factory, tmp_path, model_type) if with_adapter else path / "adapter"  # bundle's adapter: B = 0
    gen = TextGenerator(path)
    name = BASE
    if with_adapter:
        gen.decoder.add_adapter("a", adapter)
        name = "a"
    hf_tok = AutoTokenizer.from_pretrained(factory.model(model_type))
    prompt_ids = gen.encode(PROMPT)
    assert prompt_ids == hf_tok(PROMPT)["input_ids"]  # tokenized exactly as transformers does
    stream = gen.stream(prompt_ids, name, Sampling(max_new_tokens=32))
    assert "".join(stream) == stream.text
    # All 32 tokens are compared with no stop token on either side: an early stop on both sides,
    # even an immediate EOS (the tiny qwen3's base model), would compare little or nothing. The
    # stream, which stops at EOS, gives a prefix of them.
    got = list(gen.decoder.generate_ids(prompt_ids, name, Sampling(max_new_tokens=32), stop_ids=set()))
    assert len(got) == 32 and stream.tokens == got[: len(stream.tokens)]
    model = torch_peft_model(factory.model(model_type), adapter)
    # Phi3's longrope switch (32 tokens in the tiny model) is crossed while decoding: edgeft
    # recomputes its cache there (Decoder._recompute), which equals transformers without a cache;
    # transformers 4.57's cached generate re-runs that one step without a causal mask.
    switch = gen.decoder.recompute_beyond
    crosses = switch is not None and len(prompt_ids) <= switch < len(prompt_ids) + 32
    assert crosses is (model_type == "phi3")
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt_ids]),
            max_new_tokens=32,
            do_sample=False,
            use_cache=not crosses,
            eos_token_id=None,
        )
    assert got == out[0, len(prompt_ids) :].tolist()


def test_adapters_switch_without_new_session(factory, tmp_path):
    path = factory.bundle("llama")
    a, b = _adapter(factory, tmp_path, "llama", seed=1), _adapter(factory, tmp_path, "llama", seed=2)
    expected = {}
    for name, adapter in (("a", a), ("b", b), (BASE, None)):
        solo = TextGenerator(path)
        if adapter:
            solo.decoder.add_adapter(name, adapter)
        expected[name] = _run(solo, name)
    assert len(set(map(tuple, expected.values()))) == 3  # three really different outputs

    shared = TextGenerator(path)
    shared.decoder.add_adapter("a", a)
    shared.decoder.add_adapter("b", b)
    before = Decoder.sessions_created
    for name in ("a", BASE, "b", "a", "b", BASE):
        assert _run(shared, name) == expected[name]
    assert Decoder.sessions_created == before


def test_decoder_lora_returns_last_position_logits(factory, tmp_path):
    """decoder_lora.onnx: [1, 1, vocab] on a prefill, equal to PEFT's last-position logits;
    decoder.onnx (handed to optimum by merge) keeps one row per position."""
    import onnx
    import torch

    path = factory.bundle("phi3")
    adapter = _adapter(factory, tmp_path, "phi3")
    gen = TextGenerator(path)
    gen.decoder.add_adapter("a", adapter)
    ids = np.array([gen.encode(PROMPT)], np.int64)
    n = ids.shape[1]
    logits, _ = gen.decoder.step(ids, np.ones_like(ids), np.arange(n)[None], gen.decoder.empty_past(), "a")
    with torch.no_grad():
        ref = torch_peft_model(factory.model("phi3"), adapter)(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert n > 4 and logits.shape == (1, 1, ref.shape[-1])
    np.testing.assert_allclose(logits[:, -1], ref[:, -1], atol=1e-4, rtol=0)
    full = onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph.output[0]
    assert full.type.tensor_type.shape.dim[1].dim_param == "sequence_length"


def _run(gen: TextGenerator, name: str) -> list[int]:
    stream = gen.stream(gen.encode(PROMPT), name, Sampling(max_new_tokens=16))
    list(stream)
    return stream.tokens


def test_generate_cli_stream_stop_and_sampling(factory, tmp_path):
    path = factory.bundle("llama")
    adapter = _adapter(factory, tmp_path, "llama")
    out = io.StringIO()
    text = generate(GenerateConfig(path, PROMPT, adapter=adapter, max_new_tokens=24), out)
    assert out.getvalue() == text + "\n" and text
    stop = text[3:6]
    cut = generate(GenerateConfig(path, PROMPT, adapter=adapter, max_new_tokens=24, stop=[stop]), io.StringIO())
    assert cut == text[: text.find(stop)]
    sampled = [
        generate(
            GenerateConfig(path, PROMPT, adapter=adapter, temperature=1.0, top_k=50, top_p=0.9, seed=s), io.StringIO()
        )
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1] != sampled[2]  # seeded sampling is reproducible


def test_chat_prompt_uses_template(factory):
    from transformers import AutoTokenizer

    gen = TextGenerator(factory.bundle("llama"))
    messages = [{"role": "user", "content": PROMPT}]
    hf_tok = AutoTokenizer.from_pretrained(factory.model("llama"))
    assert gen.encode(None, messages) == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_sliding_window_equals_transformers(factory, tmp_path):
    """A mistral config with a window shorter than the prompt: GroupQueryAttention's local window
    (W - 1 keys to the left) attends exactly as transformers' sliding-window mask (q - k < W)."""
    import json
    import shutil

    import torch

    from edgeft.host.export import ExportConfig, export_bundle

    model_dir = tmp_path / "mistral-window"
    shutil.copytree(factory.model("mistral"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["sliding_window"] = 6
    (model_dir / "config.json").write_text(json.dumps(config))
    bundle = export_bundle(ExportConfig(model_dir, tmp_path / "bundle", max_seq_len=64))
    adapter = make_peft_adapter(model_dir, tmp_path / "adapter", targets=["q_proj", "v_proj"], b_std=0.3)
    gen = TextGenerator(bundle)
    gen.decoder.add_adapter("a", adapter)
    ids = gen.encode(PROMPT)
    stream = gen.stream(ids, "a", Sampling(max_new_tokens=24))
    list(stream)
    model = torch_peft_model(model_dir, adapter)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert len(ids) > 12 and stream.tokens == out[0, len(ids) : len(ids) + len(stream.tokens)].tolist()
    assert len(stream.tokens) >= 12


def test_serving_graph_follows_the_installed_onnxruntime():
    """A sliding-window GroupQueryAttention decoder needs onnxruntime >= 1.23 (its window counts the
    current token from then on); older ones get the eager twin, or a one-line refusal without one."""
    from edgeft.device.decoder import serving_graph
    from edgeft.errors import EdgeftError

    gqa = {"file": "decoder_lora.onnx", "kv_cache": "shared", "min_onnxruntime": "1.23"}
    eager = {"file": "decoder_lora_eager.onnx"}
    graphs = {"decoder_lora": gqa, "decoder_lora_eager": eager}
    assert serving_graph(graphs, "1.32.0") is gqa and serving_graph(graphs, "1.23.0") is gqa
    assert serving_graph(graphs, "1.22.1") is eager and serving_graph(graphs, "1.19.2") is eager
    assert serving_graph({"decoder_lora": eager}, "1.19.2") is eager  # no requirement: any version
    with pytest.raises(EdgeftError, match=r"needs onnxruntime >= 1.23 \(installed: 1.20.1\)"):
        serving_graph({"decoder_lora": gqa}, "1.20.1")
