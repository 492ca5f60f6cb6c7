"""Device stage: a bundle as an onnxruntime-genai model with multi-LoRA adapters. Entry for the CLI:
:func:`export_genai`; :func:`genai_config` also serves ``edgeft merge``.

onnxruntime-genai loads a directory holding ``genai_config.json`` (the decoder's file and I/O
names, heads, layers, context, token ids, search defaults), the decoder and the tokenizer files.
Its ``Adapters`` API switches LoRA adapters per generator through ONNX Runtime's LoRA support
(ORT >= 1.20): an ``.onnx_adapter`` file (``onnxruntime.AdapterFormat``) names tensors that
replace *overridable initializers* (graph inputs with a default) for a run.

``decoder_lora.onnx`` already has the LoRA tensors as graph inputs; this stage writes it as
``model.onnx`` with a default for each (A = B = 0, DoRA magnitudes ``||W||`` per row: the base
model), appended to the serialized model as a second ``graph`` field with ``initializer``
entries, which protobuf merges into the first. onnxruntime-genai reads every position's logits
after a prompt, so the default of the decoder's ``logits_to_keep`` input (1) is patched in place
to keep them all (same byte length). So neither torch nor the ``onnx`` package is needed. The weights are the bundle's
``weights.safetensors`` (hard-linked where the file system allows, else copied): the decoder's
external data points at byte ranges of it. Each adapter becomes ``<name>.onnx_adapter`` holding
its LoRA tensors under the decoder's input names (B already rescaled to the bundle's scaling).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.errors import EdgeftError

CONFIG = "genai_config.json"
MODEL_FILE = "model.onnx"
WEIGHTS = "weights.safetensors"
ADAPTER_SUFFIX = ".onnx_adapter"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja")
GENAI_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "phi3",
    "qwen3",
    "gemma3_text",
)  # model types edgeft exports and onnxruntime-genai runs


@dataclass
class GenaiConfig:
    bundle: Path
    out: Path
    adapters: dict[str, Path] = field(default_factory=dict)  # adapter name -> PEFT adapter directory
    overwrite: bool = False
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)


def export_genai(cfg: GenaiConfig) -> Path:
    """Write the onnxruntime-genai model directory for ``cfg.bundle`` and its adapters; return its path."""
    from edgeft.device.adapter import base_lora, load_adapter
    from edgeft.device.merge import check_out
    from edgeft.fsutil import staged_directory

    bundle = Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key)
    for name in cfg.adapters:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise EdgeftError(f"--adapter {name}=...: the name must be a plain file name")
    out = check_out(Path(cfg.out), bundle.root, list(cfg.adapters.values()), cfg.overwrite)
    graph = bundle.manifest["graphs"]["decoder_lora"]
    lora_inputs = graph["lora_inputs"]
    adapters = {}
    for name, path in cfg.adapters.items():
        lora = load_adapter(path, bundle)
        adapters[name] = {n: lora[n] for n in lora_inputs}
    with staged_directory(out) as staging:
        (staging / MODEL_FILE).write_bytes(lora_decoder_model(bundle, base_lora(bundle, lora_inputs)))
        _link_or_copy(bundle.path(bundle.manifest.get("weights", WEIGHTS)), staging / WEIGHTS)
        bundle.copy_files(staging, TOKENIZER_FILES, OPTIONAL_FILES, "onnxruntime-genai's tokenizer")
        shared = graph.get("kv_cache") == "shared"  # GroupQueryAttention: genai appends to the cache in place
        write_config(staging, genai_config(bundle, MODEL_FILE, share_buffer=shared))
        for name, lora in adapters.items():
            write_adapter(lora, staging / f"{name}{ADAPTER_SUFFIX}")
    return out


def lora_decoder_model(bundle: Bundle, defaults: dict[str, np.ndarray]) -> bytes:
    """``decoder_lora.onnx`` as onnxruntime-genai's decoder: every position's logits, and ``defaults``
    (one per LoRA input) appended as overridable initializers."""
    graph = bundle.manifest["graphs"]["decoder_lora"]
    source = bundle.path(graph["file"])
    extra = appended_initializers({n: defaults[n] for n in graph["lora_inputs"]})
    return keep_all_logits(source.read_bytes(), source) + extra


def genai_supported(bundle: Bundle) -> bool:
    return json.loads(bundle.path("config.json").read_text()).get("model_type") in GENAI_TYPES


def genai_config(bundle: Bundle, filename: str, share_buffer: bool = False) -> dict:
    """``genai_config.json`` for the decoder ``filename`` (optimum's I/O names). ``share_buffer``:
    the decoder's attention is GroupQueryAttention, so onnxruntime-genai may preallocate the KV
    cache and bind it as past and present (``past_present_share_buffer``); otherwise the cache
    ``[batch, kv_heads, past, head_dim]`` is fed back grown each step."""
    hf = json.loads(bundle.path("config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in GENAI_TYPES:
        raise EdgeftError(
            f"{bundle.path('config.json')}: model_type {model_type!r} is not one onnxruntime-genai runs "
            f"from edgeft ({', '.join(GENAI_TYPES)})"
        )
    heads = hf["num_attention_heads"]
    from edgeft.device.tokenizer import BundleTokenizer

    gen = _read_json(bundle.path("generation_config.json"))
    tok = BundleTokenizer.from_dir(bundle.root)
    # The stop tokens edgeft generate uses: the tokenizer's eos and generation_config's eos ids.
    eos = sorted({tok.eos_token_id} - {None} | set(_as_list(gen.get("eos_token_id"))))
    if not eos:
        eos = _as_list(hf.get("eos_token_id"))
    bos = _first_set(gen.get("bos_token_id"), hf.get("bos_token_id"), tok.bos_token_id)
    pad = _first_set(gen.get("pad_token_id"), hf.get("pad_token_id"), tok.pad_token_id, *eos[:1])
    context = bundle.max_seq_len
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": hf.get("head_dim") or hf["hidden_size"] // heads,
                "hidden_size": hf["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": hf["num_hidden_layers"],
                "num_key_value_heads": hf.get("num_key_value_heads") or heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": hf["vocab_size"],
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_config(directory: Path, config: dict) -> None:
    (directory / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def write_adapter(lora: dict[str, np.ndarray], path: Path) -> None:
    """``lora`` as an ONNX Runtime adapter file (``onnxruntime.AdapterFormat``, ORT >= 1.20)."""
    from edgeft.device.session import onnxruntime

    ort = onnxruntime()
    if not hasattr(ort, "AdapterFormat"):
        raise EdgeftError(f"onnxruntime {ort.__version__} cannot write {path.name}: .onnx_adapter needs >= 1.20")
    values = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, np.float32)) for n, a in lora.items()}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(values)
    adapter.export_adapter(str(path))


# ---------------------------------------------------------------------------------------------
# Protobuf, by hand: a serialized ModelProto followed by these bytes parses as the same model with
# the extra initializers (ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto dims = 1,
# data_type = 2, name = 8, raw_data = 9).

_ONNX_FLOAT = 1
LOGITS_TO_KEEP = "logits_to_keep"
KEEP_ALL = 1 << 31  # at least any sequence length: every position's logits


def keep_all_logits(model: bytes, path: Path) -> bytes:
    """``model`` with its int64 initializer ``logits_to_keep`` (the default of that input) set to
    ``KEEP_ALL``, rewritten in place: the 8 bytes of its ``raw_data``."""
    buf = bytearray(model)
    for g_start, g_end in _fields(buf, 0, len(buf), 7):
        for t_start, t_end in _fields(buf, g_start, g_end, 5):
            names = list(_fields(buf, t_start, t_end, 8))
            if len(names) != 1 or bytes(buf[slice(*names[0])]) != LOGITS_TO_KEEP.encode():
                continue
            raw = list(_fields(buf, t_start, t_end, 9))
            if len(raw) != 1 or raw[0][1] - raw[0][0] != 8:
                raise EdgeftError(f"{path}: initializer {LOGITS_TO_KEEP} is not an int64 scalar in raw_data")
            buf[slice(*raw[0])] = np.int64(KEEP_ALL).astype("<i8").tobytes()
            return bytes(buf)
    raise EdgeftError(
        f"{path}: the decoder has no {LOGITS_TO_KEEP} input (exported by an older edgeft), so it returns the last "
        "position's logits only, and onnxruntime-genai needs them all; re-export the bundle with this edgeft"
    )


def _fields(buf: bytearray, start: int, end: int, number: int):
    """(payload start, end) of each length-delimited field ``number`` of the message in ``buf[start:end]``."""
    i = start
    while i < end:
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _read_varint(buf, i)
            if key >> 3 == number:
                yield i, i + length
            i += length
        else:
            raise EdgeftError(f"unexpected protobuf wire type {wire} at byte {i}")


def _read_varint(buf: bytearray, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def appended_initializers(tensors: dict[str, np.ndarray]) -> bytes:
    """Bytes that, appended to a serialized ModelProto, add ``tensors`` (float32) as initializers."""
    graph = b"".join(_bytes_field(5, _tensor_proto(name, array)) for name, array in tensors.items())
    return _bytes_field(7, graph)


def _tensor_proto(name: str, array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype="<f4")
    dims = b"".join(_varint_field(1, d) for d in array.shape)
    return dims + _varint_field(2, _ONNX_FLOAT) + _bytes_field(8, name.encode()) + _bytes_field(9, array.tobytes())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# ---------------------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(src, dst)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EdgeftError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _as_list(value) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def _first_set(*values):
    return next((v for v in values if v is not None), None)
