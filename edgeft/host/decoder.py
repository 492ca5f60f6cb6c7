"""Host stage: the KV-cache decoder graphs of a bundle, for serving.

Two graphs, both with optimum's I/O names and layouts (``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``):

- ``decoder_lora.onnx``: LoRA A/B are graph *inputs*, so one session serves the base model
  and any number of adapters, switched per request. It returns the logits of the last
  ``logits_to_keep`` positions (all of them when it is at least the sequence length): an optional
  int64 scalar input whose default (an initializer of the same name, 1) is what a generator
  needs; a scorer (echo / prompt log-probabilities) feeds the prompt length.
- ``decoder.onnx``: the plain base model, the template ``edgeft merge`` fills with fused weights.

Base weights are not copied: each weight initializer points (ONNX external data) into
``weights.safetensors`` at that tensor's byte range, so training and serving share one file.
"""

from __future__ import annotations

import functools
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.host.graph import externalize
from edgeft.models import attention_layout

DECODER_LORA = "decoder_lora.onnx"
DECODER = "decoder.onnx"
LOGITS_TO_KEEP = "logits_to_keep"  # decoder_lora.onnx: how many last positions get logits (default 1)
MATMUL_NBITS = True  # int4 decoders: MatMulNBits over the stored bytes (False: dequantize + MatMul)
MATMUL_INTEGER = True  # int8 decoders: DynamicQuantizeLinear + MatMulInteger (False: dequantize + MatMul)
# decoder_lora.onnx attention: com.microsoft.GroupQueryAttention, whose KV cache a device can preallocate
# and bind as both past and present (False: transformers' eager attention, the cache grown by Concat).
GQA = True
KV_CACHE_SHARED = "shared"  # graphs.decoder_lora.kv_cache: past and present may be one buffer
# onnxruntime 1.23 made GroupQueryAttention's local_window_size count the current token (PR 25927):
# a sliding-window GQA decoder is exact from there on; its softcap attribute exists from 1.20. A
# device whose onnxruntime is older than its decoder needs runs the eager twin of it.
DECODER_LORA_EAGER = "decoder_lora_eager.onnx"
GQA_WINDOW_MIN_ORT, GQA_SOFTCAP_MIN_ORT = "1.23", "1.20"


def export_decoders(
    peft_model, hf_config: dict, file_keys: dict[str, str], ranges: dict, out: Path, quant=None
) -> dict:
    """Write both decoder graphs into ``out``; returns their manifest entries.

    ``file_keys``/``ranges``: graph name -> weights.safetensors key, key -> byte range (the file is
    already written). ``quant`` (``--quantize``): {onnx name: QuantTensor}; those weights are read
    from their quantized data and scales."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    entries = {}
    for key, name, with_lora, gqa in _decoder_variants(peft_model, hf_config):
        model = _trace(peft_model, hf_config, out, with_lora, gqa)
        graph = model.graph
        if gqa:
            from edgeft.host.quantize import ensure_ms_domain

            ensure_ms_domain(model)
            del graph.value_info[:]  # trace-time shapes around the custom op; onnxruntime infers its own
        if quant:
            from edgeft.host.quantize import ensure_ms_domain, rewrite_graph

            present = {i.name for i in graph.input}
            here = {n: q for n, q in quant.items() if n in present}
            rewrite_graph(graph, here, as_inputs=True, matmul_nbits=MATMUL_NBITS, matmul_integer=MATMUL_INTEGER)
            ensure_ms_domain(model)
        used = {i for node in graph.node for i in node.input}
        inputs = [i for i in graph.input if i.name in used or i.name.startswith("past_key_values")]
        del graph.input[:]
        graph.input.extend(inputs)  # the template decoder drops the LoRA inputs it never reads
        externalize(graph, file_keys, ranges, {})
        if with_lora:  # after externalize, which would drop an input that has an initializer
            graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), LOGITS_TO_KEEP))
        lora = [i.name for i in graph.input if ".lora_" in i.name]
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        if with_lora and sorted(lora) != sorted(trainable):
            raise EdgeftError(f"{name}: the traced decoder's LoRA inputs differ from the model's LoRA tensors")
        onnx.save(model, str(out / name))
        entries[key] = {
            "file": name,
            "inputs": [i.name for i in graph.input],
            "outputs": [o.name for o in graph.output],
            "lora_inputs": lora,
            **({"kv_cache": KV_CACHE_SHARED} if gqa else {}),
        }
    need = _gqa_min_onnxruntime(peft_model) if "decoder_lora_eager" in entries else None
    if need:
        entries["decoder_lora"]["min_onnxruntime"] = need
    return entries


def _decoder_variants(peft_model, hf_config: dict) -> list[tuple[str, str, bool, bool]]:
    """(manifest key, file, with LoRA inputs, GroupQueryAttention) of each decoder to write."""
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    gqa = GQA and head_dim % 8 == 0  # onnxruntime's CPU kernel takes head sizes in multiples of 8
    variants = [("decoder_lora", DECODER_LORA, True, gqa), ("decoder", DECODER, False, False)]
    if gqa and _gqa_min_onnxruntime(peft_model):
        variants.append(("decoder_lora_eager", DECODER_LORA_EAGER, True, False))
    return variants


def _gqa_min_onnxruntime(peft_model) -> str | None:
    """The oldest onnxruntime whose GroupQueryAttention computes this model's attention exactly."""
    config = peft_model.base_model.model.config.to_dict()
    if any(attention_layout(config).windows.values()):
        return GQA_WINDOW_MIN_ORT
    return GQA_SOFTCAP_MIN_ORT if config.get("attn_logit_softcapping") else None


def decoder_module(peft_model, hf_config: dict, last_logits: bool = False, gqa: bool = False):
    """torch module: (input_ids, attention_mask, position_ids, *past[, logits_to_keep]) -> (logits, *present).

    ``last_logits``: the module takes a last argument ``logits_to_keep`` (int64 scalar) and returns
    the logits of that many last positions (``[batch, keep, vocab]``); a generator keeps 1, so a
    prefill skips lm_head over the rest of the prompt (transformers' ``logits_to_keep``).

    ``gqa``: attention is one ``GroupQueryAttention`` per layer (see :func:`gqa_attention`); trace
    it inside :func:`gqa_tracing`."""
    import torch
    from transformers import DynamicCache

    layers = hf_config["num_hidden_layers"]
    layout = attention_layout(peft_model.base_model.model.config.to_dict())

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            keep = None
            if last_logits:
                *past, keep = past
            mask = layout.mask_argument(lambda window: decode_mask(attention_mask, input_ids.shape[1], window))
            if gqa:  # the attention op reads each layer's past and writes its present (a 4-D mask: unused)
                _GQA_STATE.update(
                    past=past,
                    present={},
                    seqlens_k=(attention_mask.sum(dim=1) - 1).to(torch.int32),
                    total=torch._shape_as_tensor(attention_mask)[1].to(torch.int32),
                )
                cache = None
            else:
                cache = DynamicCache.from_legacy_cache(tuple((past[2 * i], past[2 * i + 1]) for i in range(layers)))
            kwargs = dict(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=not gqa,
            )
            if keep is not None:  # a tensor of positions: transformers gathers those rows before lm_head
                seq = input_ids.shape[1]
                kwargs["logits_to_keep"] = torch.arange(torch.clamp(seq - keep, min=0), seq)
            out = self.peft(**kwargs)
            if gqa:
                present = [t for i in range(layers) for t in _GQA_STATE["present"][i]]
            else:
                present = [t for layer in out.past_key_values.to_legacy_cache() for t in layer]
            return (out.logits, *present)

    return Decoder()


# ---------------------------------------------------------------------------------------------
# GroupQueryAttention. transformers computes q/k/v, applies its rotary embedding (every model
# type's own variant), then calls the registered attention function; ours hands the rotated
# q and the new k/v to com.microsoft.GroupQueryAttention with the layer's past, which appends
# them to the cache and attends causally (plus the sliding window). onnxruntime's CPU kernel
# appends in place when past and present are the same buffer (`past_present_share_buffer`, as
# onnxruntime-genai runs it), and concatenates otherwise, so a device that feeds a growing cache
# still gets the same values. seqlens_k / total_sequence_length come from the 2-D attention mask.

GQA_ATTENTION = "edgeft_gqa"
_GQA_STATE: dict = {}


def gqa_attention(
    module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None, **_kwargs
):
    """transformers attention function: ``query`` ``[b, heads, s, d]`` (rotated), ``key``/``value``
    ``[b, kv_heads, s, d]`` (this step's only) -> ``[b, s, heads, d]``."""
    state, layer = _GQA_STATE, module.layer_idx
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    q, k, v = (t.transpose(1, 2).reshape(b, s, t.shape[1] * d) for t in (query, key, value))
    # transformers' sliding window keeps keys with q - k < W: onnxruntime >= 1.23's local window of W
    # (the current token included; GQA_WINDOW_MIN_ORT).
    window = int(sliding_window) if sliding_window else -1
    past_k, past_v = state["past"][2 * layer], state["past"][2 * layer + 1]
    out, present_k, present_v = _group_query_attention()(
        q, k, v, past_k, past_v, state["seqlens_k"], state["total"], heads, kv_heads, float(scaling), window,
        float(softcap or 0.0),
    )  # fmt: skip
    state["present"][layer] = (present_k, present_v)
    return out.reshape(b, s, heads, d), None


@functools.cache
def _group_query_attention():
    """``torch.ops.edgeft.group_query_attention``, exported (TorchScript exporter) as one
    com.microsoft node; its eager body (attention over past + new) only gives the tracer values of
    the right shapes."""
    import torch
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    schema = (
        "(Tensor q, Tensor k, Tensor v, Tensor past_k, Tensor past_v, Tensor seqlens_k, Tensor total, "
        "int heads, int kv_heads, float scale, int window, float softcap) -> (Tensor, Tensor, Tensor)"
    )  # spelled out: this module's annotations are strings (from __future__ import annotations)

    @torch.library.custom_op("edgeft::group_query_attention", mutates_args=(), schema=schema)
    def group_query_attention(q, k, v, past_k, past_v, seqlens_k, total, heads, kv_heads, scale, window, softcap):
        b, s, _ = q.shape
        d = q.shape[-1] // heads
        present_k = torch.cat([past_k, k.reshape(b, s, kv_heads, d).transpose(1, 2)], 2)
        present_v = torch.cat([past_v, v.reshape(b, s, kv_heads, d).transpose(1, 2)], 2)
        keys = present_k.repeat_interleave(heads // kv_heads, 1)
        values = present_v.repeat_interleave(heads // kv_heads, 1)
        scores = q.reshape(b, s, heads, d).transpose(1, 2) @ keys.transpose(-1, -2) * scale
        t = keys.shape[2]
        causal = torch.ones(s, t, dtype=torch.bool).tril(t - s)
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (scores.softmax(-1) @ values).transpose(1, 2).reshape(b, s, heads * d)
        return out, present_k, present_v

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "i", "i", "f", "i", "f")
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, heads, kv_heads, scale, window, softcap):
        extra = {"softcap_f": softcap} if softcap else {}  # an attribute onnxruntime 1.19 does not know
        outputs = g.op(
            "com.microsoft::GroupQueryAttention",
            q, k, v, past_k, past_v, seqlens_k, total,
            num_heads_i=heads, kv_num_heads_i=kv_heads, scale_f=scale, local_window_size_i=window, outputs=3,
            **extra,
        )  # fmt: skip
        for value, like in zip(outputs, (q, past_k, past_v), strict=True):
            value.setType(like.type())  # dtype (shapes are dynamic; value_info is dropped after the trace)
        return outputs

    register_custom_op_symbolic("edgeft::group_query_attention", symbolic, 1)
    return torch.ops.edgeft.group_query_attention


def gqa_tracing(peft_model):
    """Context manager: ``peft_model``'s attention layers call :func:`gqa_attention` meanwhile."""
    import contextlib

    from transformers import AttentionInterface

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    config = peft_model.get_base_model().config

    @contextlib.contextmanager
    def swapped():
        before = config._attn_implementation
        config._attn_implementation = GQA_ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = before
            _GQA_STATE.clear()

    return swapped()


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


def _trace(peft_model, hf_config: dict, out: Path, with_lora: bool, gqa: bool = False):
    import contextlib

    import torch

    from edgeft.host.training import trace

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
        "logits": {0: "batch_size", 1: "logits_length" if with_lora else "sequence_length"},
    }
    dynamic.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names})
    dynamic.update({n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names})
    # edgeft's own decoder (with LoRA inputs) returns the last `logits_to_keep` positions' logits; the
    # adapter-free decoder.onnx keeps every position's, since `edgeft merge` hands it to optimum as is.
    module = decoder_module(peft_model, hf_config, last_logits=with_lora, gqa=gqa).eval()
    adapters = contextlib.nullcontext() if with_lora else peft_model.disable_adapter()
    attention = gqa_tracing(peft_model) if gqa else contextlib.nullcontext()
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    args = (ids, mask, pos, *past)
    if with_lora:
        names.append(LOGITS_TO_KEEP)
        args = (*args, torch.tensor(2, dtype=torch.int64))
    with adapters, attention:
        return trace(module, args, out / ".decoder.raw", names, ["logits", *present_names], dynamic)
