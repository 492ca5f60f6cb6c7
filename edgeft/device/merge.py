"""Device stage: fuse a LoRA adapter into the base weights. Entry for the CLI: :func:`merge`.

The result is a standalone directory that optimum's ``ORTModelForCausalLM.from_pretrained`` loads
(``model.onnx`` + config + tokenizer), with no LoRA inputs and no edgeft needed to serve it; its
``genai_config.json`` (``edgeft.device.genai``) makes it an onnxruntime-genai model as well, run
from ``model_genai.onnx`` (the bundle's GroupQueryAttention decoder, LoRA inputs defaulting to
the merged model) where the bundle has one.

No torch, transformers, peft, optimum or onnx: the bundle's ``decoder.onnx`` (the adapter-free
decoder) is copied verbatim as ``model.onnx``. Its weights are ONNX external data pointing at
byte ranges of ``weights.safetensors`` beside it, so the merged ``weights.safetensors`` keeps the
bundle's header byte for byte (same keys, dtypes, shapes, offsets) and only the LoRA-targeted
tensors' bytes change: ``W' = W + s * B @ A`` in fp32, with each module's scaling ``s`` from the
manifest (``lora.scaling``: ``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``, per-module patterns;
``load_adapter`` already rescales B from the adapter's own scaling to the bundle's). DoRA modules
are fused as PEFT's ``merge_and_unload`` does: ``W' = m / ||W + s * B @ A||_row * (W + s * B @ A)``,
the L2 norm taken over each output row (``dim=1`` of the ``[out, in]`` weight).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle, lora_module, read_safetensors_header
from edgeft.errors import EdgeftError
from edgeft.fsutil import staged_directory
from edgeft.tasks import CAUSAL_LM, Task, require

MODEL_FILE = "model.onnx"  # optimum's standard name: found without passing file_name
GENAI_MODEL_FILE = "model_genai.onnx"  # the GroupQueryAttention twin genai_config.json names
WEIGHTS = "weights.safetensors"  # the name decoder.onnx's external data points at
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class MergeConfig:
    bundle: Path
    adapter: Path
    out: Path
    overwrite: bool = False
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)


def merge(cfg: MergeConfig) -> Path:
    """Write the bundle's base model with ``cfg.adapter`` fused in to ``cfg.out``; return its path."""
    from edgeft.device.adapter import bundle_scaling, load_adapter
    from edgeft.device.genai import genai_supported

    bundle = Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key)
    require(Task.of(bundle.manifest), (CAUSAL_LM,), "edgeft merge")
    quantization = bundle.manifest.get("quantization")
    if quantization:
        raise EdgeftError(
            f"{bundle.root}: the base weights are {quantization.get('scheme')}-quantized; merge needs a float32 "
            "bundle (export one without --quantize and merge the same adapter into it)"
        )
    out = check_out(Path(cfg.out), bundle.root, [Path(cfg.adapter)], cfg.overwrite)
    decoder = _decoder_graph(bundle)
    weights = bundle.path(bundle.manifest.get("weights", WEIGHTS))
    header_bytes, header = read_safetensors_header(weights)
    lora = load_adapter(cfg.adapter, bundle)
    pairs = _lora_pairs(bundle, header, weights)

    with staged_directory(out) as staging:
        shutil.copyfile(decoder, staging / MODEL_FILE)
        _write_fused(weights, header_bytes, header, pairs, lora, bundle_scaling(bundle), staging / WEIGHTS)
        _check_same_layout(staging / WEIGHTS, header_bytes, weights)
        bundle.copy_files(staging, REQUIRED_FILES, OPTIONAL_FILES, "the merged model")
        if genai_supported(bundle):  # onnxruntime-genai loads the same directory
            _write_genai(bundle, lora, staging)
    return out


def _write_genai(bundle: Bundle, lora: dict[str, np.ndarray], staging: Path) -> None:
    """genai_config.json, and the GroupQueryAttention decoder it names where the bundle has one
    (onnxruntime-genai then appends to one preallocated cache: measured 0.68x as fast at context
    2048 on model.onnx's growing cache). Its LoRA inputs default to A = B = 0 and, for DoRA, to
    the trained magnitudes m: the fused rows W' have norm m, so m / ||W'|| * W' = W'."""
    from edgeft.device.adapter import is_magnitude
    from edgeft.device.genai import genai_config, lora_decoder_model, write_config

    graph = bundle.manifest["graphs"].get("decoder_lora", {})
    if graph.get("kv_cache") != "shared":
        write_config(staging, genai_config(bundle, MODEL_FILE))
        return
    defaults = {n: lora[n] if is_magnitude(n) else np.zeros_like(lora[n]) for n in graph["lora_inputs"]}
    (staging / GENAI_MODEL_FILE).write_bytes(lora_decoder_model(bundle, defaults))
    write_config(staging, genai_config(bundle, GENAI_MODEL_FILE, share_buffer=True))


def check_out(out: Path, bundle_root: Path, adapters: list[Path], overwrite: bool) -> Path:
    """``out`` resolved, if it may be written: not overlapping the bundle or an adapter directory."""
    resolved = out.resolve()
    for name, other in (("bundle", bundle_root), *(("adapter", a) for a in adapters)):
        other = other.resolve()
        if resolved == other or resolved in other.parents or other in resolved.parents:
            raise EdgeftError(f"{out}: --out must not be, contain or be inside the {name} directory {other}")
    if out.exists() and not out.is_dir():
        raise EdgeftError(f"{out}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise EdgeftError(f"{out}: already exists (pass --overwrite to replace it)")
    return resolved


def _decoder_graph(bundle: Bundle) -> Path:
    graph = bundle.manifest.get("graphs", {}).get("decoder")
    if graph is None:
        raise EdgeftError(f"{bundle.root}: this bundle has no decoder graph; re-export it with this edgeft")
    if graph.get("lora_inputs"):
        raise EdgeftError(f"{bundle.path(graph['file'])}: the decoder graph has LoRA inputs; it cannot be merged into")
    return bundle.path(graph["file"])


def _lora_pairs(bundle: Bundle, header: dict, weights: Path) -> list[tuple[str, str, str, str | None, str]]:
    """(HF key of the base weight, ONNX name of A, ONNX name of B, ONNX name of the DoRA magnitude
    or None, module) for each LoRA module.

    The base weight is the frozen parameter ``<module>.base_layer.weight`` of the manifest; its
    key must be a float32 tensor of weights.safetensors used by no other parameter (a tied
    weight would change both places).
    """
    manifest = bundle.root / "manifest.json"
    frozen = {p["onnx"]: p for p in bundle.frozen}
    users: dict[str, int] = {}
    for p in bundle.frozen:
        users[p["key"]] = users.get(p["key"], 0) + 1
    trainable = {p["onnx"]: p for p in bundle.trainable}
    pairs, seen = [], set()
    for name, p in trainable.items():
        if ".lora_A." not in name and ".lora_B." not in name and ".lora_magnitude_vector." not in name:
            raise EdgeftError(
                f"{manifest}: LoRA parameter {name} is not a lora_A/lora_B/lora_magnitude_vector weight; "
                "merge supports only those"
            )
        if ".lora_A." not in name:
            continue
        module = name.split(".lora_A.")[0]
        b_name = name.replace(".lora_A.", ".lora_B.", 1)
        base = frozen.get(f"{module}.base_layer.weight")
        if b_name not in trainable or base is None:
            raise EdgeftError(f"{manifest}: LoRA module {module} has no matching lora_B or base_layer.weight")
        key = base["key"]
        entry = header.get(key)
        if not isinstance(entry, dict):
            raise EdgeftError(f"{weights}: tensor {key} (base weight of {module}) is missing")
        if entry.get("dtype") != "F32":
            raise EdgeftError(f"{weights}: tensor {key} is {entry.get('dtype')}; merge supports F32 base weights only")
        out_dim, r = trainable[b_name]["shape"]
        r_a, in_dim = p["shape"]
        if r != r_a or list(entry.get("shape", [])) != [out_dim, in_dim]:
            raise EdgeftError(
                f"{weights}: tensor {key} has shape {entry.get('shape')}, LoRA B@A of {module} is {[out_dim, in_dim]}"
            )
        if users[key] > 1 or key in seen:
            raise EdgeftError(f"{weights}: tensor {key} is shared (tied) with another parameter; cannot merge into it")
        m_name = name.replace(".lora_A.", ".lora_magnitude_vector.", 1)
        if m_name in trainable and trainable[m_name]["shape"] != [out_dim]:
            raise EdgeftError(f"{manifest}: DoRA magnitude of {module} has shape {trainable[m_name]['shape']}")
        seen.add(key)
        pairs.append((key, name, b_name, m_name if m_name in trainable else None, lora_module(p["key"])))
    return pairs


def _write_fused(
    src: Path, header_bytes: bytes, header: dict, pairs: list, lora: dict[str, np.ndarray], scaling: dict, dst: Path
) -> None:
    """Copy ``src`` to ``dst``, then overwrite each targeted tensor's bytes with W + s * B @ A
    (DoRA: m / ||W + s * B @ A||_row * (W + s * B @ A))."""
    shutil.copyfile(src, dst)
    start = len(header_bytes)
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        for key, a_name, b_name, m_name, module in pairs:
            begin, end = header[key]["data_offsets"]
            a, b = lora[a_name], lora[b_name]
            if not b.any() and m_name is None:
                continue  # a module the adapter does not target: unchanged bytes
            fin.seek(start + begin)
            w = np.frombuffer(fin.read(end - begin), dtype="<f4").reshape(header[key]["shape"])
            fused = w + np.float32(scaling[module]) * (b @ a)
            if m_name is not None:  # PEFT's DoRA merge: the norm of the unmerged W + delta, per output row
                norm = np.linalg.norm(fused, axis=1)
                fused = (lora[m_name] / norm)[:, None] * fused
            fused = fused.astype("<f4", copy=False)
            if fused.nbytes != end - begin:
                raise EdgeftError(f"{src}: tensor {key} is {end - begin} bytes, the fused one {fused.nbytes}")
            fout.seek(start + begin)
            fout.write(np.ascontiguousarray(fused).tobytes())
        fout.flush()
        os.fsync(fout.fileno())


def _check_same_layout(written: Path, header_bytes: bytes, original: Path) -> None:
    """model.onnx addresses tensors by absolute byte offset: the header must be identical."""
    got, _ = read_safetensors_header(written)
    if got != header_bytes or written.stat().st_size != original.stat().st_size:
        raise EdgeftError(f"{written}: header/offsets differ from {original}; the merged model.onnx would read garbage")
