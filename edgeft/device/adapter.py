"""PEFT LoRA adapters on the device: read any adapter that fits the bundle, write PEFT format.

Adapters are safetensors only (never pickle). Keys and shapes are PEFT's, so an adapter trained
here loads with ``PeftModel.from_pretrained`` and an adapter from the host loads here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json, fsync_dir, fsync_tree

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
        if cfg.get(flag):
            raise EdgeftError(f"{cfg_path}: {flag} adapters are not supported yet")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise EdgeftError(f"{cfg_path}: rank_pattern/alpha_pattern are not supported yet")
    if cfg.get("fan_in_fan_out"):
        raise EdgeftError(f"{cfg_path}: fan_in_fan_out adapters (Conv1D models) are not supported")
    return cfg


def load_adapter(path: str | os.PathLike, bundle: Bundle) -> dict[str, np.ndarray]:
    """LoRA tensors keyed by the bundle's ONNX names, fitted to the bundle.

    The bundle's graphs bake in the scale ``alpha / r``; an adapter with another alpha (same r)
    is fitted by rescaling B. Modules the adapter does not target get B = 0 (no effect).
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    tensors = _read_tensors(path / WEIGHTS)
    scale = (cfg["lora_alpha"] / cfg["r"]) / (bundle.manifest["lora"]["lora_alpha"] / bundle.manifest["lora"]["r"])
    known = {p["key"]: p for p in bundle.trainable}
    stray = sorted(k for k in tensors if _normalize(k) not in known)
    if stray:
        raise EdgeftError(f"{path / WEIGHTS}: tensor {stray[0]} does not fit this bundle (no such LoRA module in it)")
    normalized = {_normalize(k): v for k, v in tensors.items()}
    out = {}
    for key, p in known.items():
        arr = normalized.get(key)
        if arr is None:
            arr = np.zeros(p["shape"], np.float32) if ".lora_B." in key else _missing_a(p["shape"])
        elif list(arr.shape) != p["shape"]:
            raise EdgeftError(
                f"{path / WEIGHTS}: {key} has shape {list(arr.shape)} but this bundle expects {p['shape']} "
                f"(bundle LoRA r={bundle.manifest['lora']['r']}, adapter r={cfg.get('r')})"
            )
        elif ".lora_B." in key and scale != 1.0:
            arr = arr * np.float32(scale)
        out[p["onnx"]] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def _missing_a(shape: list[int]) -> np.ndarray:
    # Any A works when B is zero; a fixed small A keeps the module trainable if fine-tuned further.
    return np.random.default_rng(0).normal(0, 0.02, shape).astype(np.float32)


def _normalize(key: str) -> str:
    """Accept keys with or without PEFT's adapter name (``.lora_A.default.weight``)."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key) if key.count(".lora_") else key


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
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a killed writer; one writer per path
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = json.loads(bundle.path(bundle.manifest["lora"]["init_adapter"]).joinpath(CONFIG).read_text())
        atomic_write_json(staging / CONFIG, config)
        tensors = {p["key"]: np.ascontiguousarray(lora[p["onnx"]]) for p in bundle.trainable}
        save_file(tensors, str(staging / WEIGHTS), metadata={"format": "pt"})
        fsync_tree(staging)
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _swap_in(staging: Path, path: Path) -> None:
    """Move a finished directory into place; an older one is set aside until the new one is in."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    fsync_dir(path.parent)  # make both renames durable before the old copy goes
    shutil.rmtree(old, ignore_errors=True)
