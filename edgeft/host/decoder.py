"""Host stage: the KV-cache decoder graphs of a bundle, for serving.

Two graphs, both with optimum's I/O names and layouts (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``):

- ``decoder_lora.onnx``: LoRA A/B are graph *inputs*, so one session serves the base model
  and any number of adapters, switched per request.
- ``decoder.onnx``: the plain base model, the template ``edgeft merge`` fills with fused weights.

Base weights are not copied: each weight initializer points (ONNX external data) into
``weights.safetensors`` at that tensor's byte range, so training and serving share one file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from edgeft.bundle import safetensors_ranges

DECODER_LORA = "decoder_lora.onnx"
DECODER = "decoder.onnx"
WEIGHTS = "weights.safetensors"
MATMUL_NBITS = True  # int4 decoders: MatMulNBits over the stored bytes (False: dequantize + MatMul)
MATMUL_INTEGER = True  # int8 decoders: DynamicQuantizeLinear + MatMulInteger (False: dequantize + MatMul)


def export_decoders(peft_model, hf_config: dict, keys: dict[str, str], out: Path, opset: int, quant=None) -> dict:
    """Write both decoder graphs into ``out`` (which already holds weights.safetensors).

    ``quant`` (``--quantize``): {onnx name: QuantTensor}; those weights are read from their
    quantized data and scales in weights.safetensors and dequantized in the graph."""
    import onnx

    ranges = safetensors_ranges(out / WEIGHTS)
    entries = {}
    for name, with_lora in ((DECODER_LORA, True), (DECODER, False)):
        raw = out / f".{name}.raw"
        _trace(peft_model, hf_config, raw, with_lora, opset)
        model = onnx.load(str(raw))
        raw.unlink()
        if quant:
            from edgeft.host.quantize import decoder_keys, rewrite_graph

            for init in model.graph.initializer:
                init.name = init.name.removeprefix("peft.")
            for node in model.graph.node:
                node.input[:] = [i.removeprefix("peft.") for i in node.input]
            for value in model.graph.input:
                value.name = value.name.removeprefix("peft.")
            from edgeft.host.quantize import ensure_ms_domain

            present = {i.name for i in model.graph.initializer}
            quant_here = {n: q for n, q in quant.items() if n in present}
            rewrite_graph(
                model.graph, quant_here, as_inputs=False, matmul_nbits=MATMUL_NBITS, matmul_integer=MATMUL_INTEGER
            )
            ensure_ms_domain(model)
            lora_inputs = _rewire_parameters(model, decoder_keys(keys, quant), ranges)
        else:
            lora_inputs = _rewire_parameters(model, keys, ranges)
        onnx.save(model, str(out / name))
        entries["decoder_lora" if with_lora else "decoder"] = {
            "file": name,
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output],
            "lora_inputs": lora_inputs,
        }
    return entries


def decoder_module(peft_model, hf_config: dict, last_logits: bool = False):
    """torch module: (input_ids, attention_mask, position_ids, *past) -> (logits, *present).

    ``last_logits``: logits of the last position only (``[batch, 1, vocab]``), all a generator reads;
    a prefill then skips lm_head over the rest of the prompt (transformers' ``logits_to_keep=1``)."""
    import torch
    from transformers import DynamicCache

    layers = hf_config["num_hidden_layers"]
    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache.from_legacy_cache(tuple((past[2 * i], past[2 * i + 1]) for i in range(layers)))
            mask = decode_mask(attention_mask, input_ids.shape[1], window)
            kwargs = dict(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            if last_logits:
                kwargs["logits_to_keep"] = 1
            out = self.peft(**kwargs)
            present = [t for layer in out.past_key_values.to_legacy_cache() for t in layer]
            return (out.logits, *present)

    return Decoder()


def decode_mask(attention_mask, query_len, sliding_window: int | None):
    """[batch, 1, query, past + query] additive mask: causal over absolute positions + padding."""
    import torch

    total = attention_mask.shape[1]
    q_pos = torch.arange(query_len) + (total - query_len)
    k_pos = torch.arange(total)
    allowed = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if sliding_window:
        allowed = allowed & ((q_pos.unsqueeze(1) - k_pos.unsqueeze(0)) < sliding_window)
    allowed = allowed.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
    zeros = torch.zeros(allowed.shape, dtype=torch.float32)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)


def _trace(peft_model, hf_config: dict, path: Path, with_lora: bool, opset: int) -> None:
    import contextlib

    import torch

    layers = hf_config["num_hidden_layers"]
    kv_heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    batch, past_len, q_len = 2, 3, 4
    past = [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * layers)]
    ids = torch.randint(0, hf_config["vocab_size"], (batch, q_len))
    mask = torch.ones(batch, past_len + q_len, dtype=torch.long)
    pos = torch.arange(past_len, past_len + q_len).unsqueeze(0).expand(batch, q_len)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    dynamic = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size"} if with_lora else {0: "batch_size", 1: "sequence_length"},
    }
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    dynamic.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    # edgeft's own decoder (with LoRA inputs) returns the last position's logits; the adapter-free
    # decoder.onnx keeps every position's, since `edgeft merge` hands it to optimum users as is.
    module = decoder_module(peft_model, hf_config, last_logits=with_lora).eval()
    adapters = contextlib.nullcontext() if with_lora else peft_model.disable_adapter()
    with torch.no_grad(), adapters, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (ids, mask, pos, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=False,
            dynamo=False,
            keep_initializers_as_inputs=True,  # no value-based deduplication of equal weights
        )


def _rewire_parameters(model, keys: dict[str, str], ranges: dict[str, tuple[int, int]]) -> list[str]:
    """Frozen weights -> external data in weights.safetensors; LoRA tensors -> graph inputs."""
    import onnx

    graph = model.graph
    for init in graph.initializer:
        init.name = init.name.removeprefix("peft.")
    for node in graph.node:
        node.input[:] = [i.removeprefix("peft.") for i in node.input]
    for value in graph.input:
        value.name = value.name.removeprefix("peft.")
    used = {i for node in graph.node for i in node.input}
    lora = [i.name for i in graph.initializer if ".lora_" in i.name and i.name in used]
    keep = []
    for init in graph.initializer:
        if init.name not in used or init.name in lora:
            continue  # LoRA tensors become inputs; unused ones (template graph) go
        if init.name in keys and keys[init.name] in ranges:
            offset, length = ranges[keys[init.name]]
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                init.external_data.add(key=k, value=v)
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # Inputs that are initializers are optional overrides; keep only the real inputs and LoRA.
    names = {i.name for i in keep}
    real = [i for i in graph.input if i.name not in names and (i.name in used or i.name.startswith("past_key_values"))]
    del graph.input[:]
    graph.input.extend(real)
    return lora
