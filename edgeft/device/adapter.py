"""PEFT LoRA adapters on the device: read any adapter that fits the bundle, write PEFT format.

Adapters are safetensors only (never pickle). Keys and shapes are PEFT's, so an adapter trained
here loads with ``PeftModel.from_pretrained`` and an adapter from the host loads here.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle, lora_module
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json, staged_directory, write_bytes

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def read_adapter_config(path: Path) -> dict:
    cfg_path = Path(path) / CONFIG
    if not Path(path).is_dir():
        raise EdgeftError(f"{path}: adapter directory not found")
    if not cfg_path.is_file():
        raise EdgeftError(f"{cfg_path}: not found (an adapter is a PEFT directory)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise EdgeftError(f"{cfg_path}: peft_type must be LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise EdgeftError(f"{cfg_path}: field r must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise EdgeftError(f"{cfg_path}: field lora_alpha must be a positive number, got {alpha!r}")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(cfg.get(flag) or False, bool):
            raise EdgeftError(f"{cfg_path}: field {flag} must be true or false, got {cfg[flag]!r}")
    check_pattern(cfg.get("rank_pattern"), f"{cfg_path}: field rank_pattern", integer=True)
    check_pattern(cfg.get("alpha_pattern"), f"{cfg_path}: field alpha_pattern", integer=False)
    if cfg.get("fan_in_fan_out"):
        raise EdgeftError(f"{cfg_path}: fan_in_fan_out adapters (Conv1D models) are not supported")
    return cfg


def check_pattern(pattern, where: str, integer: bool) -> None:
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: {module-name regex: positive int / number}."""
    if pattern is None or pattern == {}:
        return
    kind = "positive integers" if integer else "positive numbers"
    if not isinstance(pattern, dict):
        raise EdgeftError(f"{where} must be an object mapping module names to {kind}, got {pattern!r}")
    for key, value in pattern.items():
        bad = isinstance(value, bool) or not isinstance(value, int if integer else int | float) or value <= 0
        if bad:
            raise EdgeftError(f"{where} must map module names to {kind}, got {key!r}: {value!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise EdgeftError(f"{where}: key {key!r} is not a valid pattern ({e})") from None


def pattern_value(pattern: dict | None, module: str, default):
    """PEFT's per-module override (``peft.utils.other.get_pattern_key``): the first key that matches
    the end of the module name (relative to the base model, e.g. ``model.layers.0.self_attn.q_proj``)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_scaling(cfg: dict, module: str) -> float:
    """PEFT's scaling of LoRA module ``module`` (a PEFT key prefix) under adapter config ``cfg``:
    ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``, r and alpha from the patterns."""
    name = module.removeprefix("base_model.model.")
    r = pattern_value(cfg.get("rank_pattern"), name, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def bundle_scaling(bundle: Bundle) -> dict[str, float]:
    """The scaling baked into the bundle's graphs for each LoRA module (manifest ``lora.scaling``;
    bundles from before that field have ``lora_alpha / r`` everywhere)."""
    lora = bundle.manifest["lora"]
    recorded = lora.get("scaling") or {}
    default = lora["lora_alpha"] / lora["r"]
    return {
        lora_module(p["key"]): float(recorded.get(lora_module(p["key"]), default))
        for p in bundle.trainable
        if not p.get("head")
    }


def is_magnitude(name: str) -> bool:
    """DoRA's magnitude vector (ONNX ``….lora_magnitude_vector.default.weight``, PEFT ``….lora_magnitude_vector``)."""
    return ".lora_magnitude_vector" in name


def bundle_uses_dora(bundle: Bundle) -> bool:
    return any(is_magnitude(p["onnx"]) for p in bundle.trainable)


def load_adapter(path: str | os.PathLike, bundle: Bundle) -> dict[str, np.ndarray]:
    """LoRA tensors keyed by the bundle's ONNX names, fitted to the bundle.

    The bundle's graphs bake in each module's scaling (``alpha / r`` or rsLoRA's ``alpha / sqrt(r)``,
    per-module r/alpha from the patterns); an adapter whose own scaling of a module differs (same r)
    is fitted by rescaling that module's B. Modules the adapter does not target get B = 0 (no
    effect) and, in a DoRA bundle, the magnitude ``||W||`` per output row (no effect either).
    DoRA adapters fit only DoRA bundles and plain LoRA adapters only plain ones.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    _check_variant(cfg, bundle, path / CONFIG)
    tensors = _read_tensors(path / WEIGHTS)
    scaling = bundle_scaling(bundle)
    known = {p["key"]: p for p in bundle.trainable}
    stray = sorted(k for k in tensors if _normalize(k) not in known)
    if stray:
        raise EdgeftError(f"{path / WEIGHTS}: tensor {stray[0]} does not fit this bundle (no such LoRA module in it)")
    present = {_normalize(t) for t in tensors}
    missing_head = [p["key"] for p in bundle.trainable if p.get("head") and p["key"] not in present]
    if missing_head:
        raise EdgeftError(
            f"{path / WEIGHTS}: no classification head tensor {missing_head[0]} (an adapter for this bundle is "
            "trained with its head, PEFT's modules_to_save)"
        )
    normalized = {_normalize(k): v for k, v in tensors.items()}
    out, missing_magnitudes = {}, []
    for key, p in known.items():
        arr = normalized.get(key)
        module = lora_module(key)
        if arr is None:
            if is_magnitude(key):
                missing_magnitudes.append(p)
                continue
            arr = np.zeros(p["shape"], np.float32) if ".lora_B." in key else _missing_a(p["shape"])
        elif list(arr.shape) != p["shape"] and p.get("head"):
            raise EdgeftError(
                f"{path / WEIGHTS}: classification head {key} has shape {list(arr.shape)} but this bundle expects "
                f"{p['shape']} ({p['shape'][0]} labels)"
            )
        elif list(arr.shape) != p["shape"]:
            bundle_r = known[f"{module}.lora_A.weight"]["shape"][0] if f"{module}.lora_A.weight" in known else "?"
            adapter_r = pattern_value(cfg.get("rank_pattern"), module.removeprefix("base_model.model."), cfg["r"])
            raise EdgeftError(
                f"{path / WEIGHTS}: {key} has shape {list(arr.shape)} but this bundle expects {p['shape']} "
                f"(bundle LoRA r={bundle_r}, adapter r={adapter_r})"
            )
        elif ".lora_B." in key:
            scale = adapter_scaling(cfg, module) / scaling[module]
            if scale != 1.0:
                arr = arr * np.float32(scale)
        out[p["onnx"]] = np.ascontiguousarray(arr, dtype=np.float32)
    out.update(_row_norm_magnitudes(bundle, missing_magnitudes, out, scaling))
    return out


def base_lora(bundle: Bundle, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """LoRA tensors that leave the base model unchanged: A = B = 0 and, for DoRA, m = ||W|| per row."""
    lora = {p["onnx"]: np.zeros(p["shape"], np.float32) for p in bundle.trainable if not is_magnitude(p["onnx"])}
    magnitudes = [p for p in bundle.trainable if is_magnitude(p["onnx"])]
    lora.update(_row_norm_magnitudes(bundle, magnitudes, lora, bundle_scaling(bundle)))
    return lora if names is None else {n: lora[n] for n in names}


def _check_variant(cfg: dict, bundle: Bundle, cfg_path: Path) -> None:
    dora = bundle_uses_dora(bundle)
    if cfg.get("use_dora") and not dora:
        raise EdgeftError(
            f"{cfg_path}: use_dora adapters are not supported by this bundle (exported without --dora); "
            "use a bundle exported with --dora, or export one from this adapter with --init-adapter"
        )
    if dora and not cfg.get("use_dora"):
        raise EdgeftError(
            f"{cfg_path}: a plain LoRA adapter (no use_dora) does not fit this DoRA bundle (exported with --dora); "
            "use a DoRA adapter, or a bundle exported without --dora"
        )


def _row_norm_magnitudes(
    bundle: Bundle, params: list[dict], lora: dict[str, np.ndarray], scaling: dict[str, float]
) -> dict[str, np.ndarray]:
    """DoRA magnitudes ``m = ||W + s * B @ A||`` per output row (PEFT's initial value): with them a
    DoRA module computes exactly what plain LoRA with the same A, B does (B = 0: the base layer)."""
    if not params:
        return {}
    from safetensors import safe_open

    frozen = {p["onnx"]: p["key"] for p in bundle.frozen}
    out = {}
    with safe_open(str(bundle.path(bundle.manifest["weights"])), framework="numpy") as weights:
        for p in params:
            module = lora_module(p["onnx"])
            base = frozen.get(f"{module}.base_layer.weight")
            if base is None:
                raise EdgeftError(f"{bundle.root / 'manifest.json'}: DoRA module {module} has no base_layer.weight")
            w = weights.get_tensor(base).astype(np.float64)
            a = lora.get(p["onnx"].replace(".lora_magnitude_vector.", ".lora_A.", 1))
            b = lora.get(p["onnx"].replace(".lora_magnitude_vector.", ".lora_B.", 1))
            if a is not None and b is not None and b.any():
                w = w + scaling[lora_module(p["key"])] * (b.astype(np.float64) @ a.astype(np.float64))
            out[p["onnx"]] = np.linalg.norm(w, axis=1).astype(np.float32)
    return out


def _missing_a(shape: list[int]) -> np.ndarray:
    # Any A works when B is zero; a fixed small A keeps the module trainable if fine-tuned further.
    return np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)


def _normalize(key: str) -> str:
    """Accept keys with or without PEFT's adapter name (``.lora_A.default.weight``; DoRA's
    ``.lora_magnitude_vector[.default][.weight]`` -> PEFT's ``.lora_magnitude_vector``; a head's
    ``.classifier.modules_to_save.default.weight`` -> PEFT's ``.classifier.weight``)."""
    if ".modules_to_save." in key:
        return re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)
    if not key.count(".lora_"):
        return key
    key = re.sub(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$", ".lora_magnitude_vector", key)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        bins = list(path.parent.glob("*.bin"))
        hint = " (pickle .bin adapters are refused; convert to safetensors on the host)" if bins else ""
        raise EdgeftError(f"{path}: not found{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgeftError(f"{path}: not a valid safetensors file ({e})") from None


def save_adapter(path: str | os.PathLike, bundle: Bundle, lora: dict[str, np.ndarray]) -> Path:
    """Write ``lora`` (ONNX names) as a PEFT adapter directory, atomically (staging dir + rename)."""
    from safetensors.numpy import save

    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a killed writer; one writer per path
        shutil.rmtree(stale, ignore_errors=True)
    with staged_directory(path) as staging:
        config = json.loads(bundle.path(bundle.manifest["lora"]["init_adapter"]).joinpath(CONFIG).read_text())
        atomic_write_json(staging / CONFIG, config)
        tensors = {p["key"]: np.ascontiguousarray(lora[p["onnx"]]) for p in bundle.trainable}
        # Bytes written here, not by save_file: a full disk is then a plain OSError(ENOSPC).
        write_bytes(staging / WEIGHTS, save(tensors, metadata={"format": "pt"}))
    return path
