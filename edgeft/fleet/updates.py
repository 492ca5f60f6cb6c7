"""What travels between the fleet server and its devices, and the checks on both ends (no flwr here).

Server → device, each round: the global adapter's LoRA tensors (float32, PEFT keys) and a small
config (round, run, the bundle's manifest digest, the wire format and, with ``--sign-key``, an
ed25519 signature). Device → server: the trained tensors of the same keys and shapes, its token
count, mean training loss and step count. No data, no tokens of text, no gradients leave a device.

The signature covers a digest of every tensor (name, dtype, shape, bytes), the round, the run and
the bundle, so a device with ``--trusted-key`` refuses an unsigned global, an altered tensor, a
global of another bundle, and a replay of an old round (its round or run differs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle, lora_module
from edgeft.errors import EdgeftError
from edgeft.fleet.aggregate import A_KEY, update_norm

WIRE_FORMAT = 1


class Rejected(Exception):
    """An update the server does not aggregate; the text says why."""


def bundle_digest(bundle: Bundle) -> str:
    """The bundle's identity on the wire: sha256 of its manifest (which lists every file's sha256)."""
    return hashlib.sha256(json.dumps(bundle.manifest, sort_keys=True).encode()).hexdigest()


def peft_tensors(bundle: Bundle, lora: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """LoRA tensors keyed by the bundle's ONNX names -> the same keyed by PEFT keys."""
    return {p["key"]: np.ascontiguousarray(lora[p["onnx"]], np.float32) for p in bundle.trainable}


def onnx_tensors(bundle: Bundle, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT keys -> the bundle's ONNX names (the inverse of :func:`peft_tensors`)."""
    return {p["onnx"]: np.ascontiguousarray(tensors[p["key"]], np.float32) for p in bundle.trainable}


def module_ranks(bundle: Bundle) -> dict[str, int]:
    return {lora_module(p["key"]): p["shape"][0] for p in bundle.trainable if p["key"].endswith(A_KEY)}


def digest(tensors: dict[str, np.ndarray], run: str, round_: int, bundle_sha: str) -> bytes:
    """sha256 over the wire format, bundle, run, round and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(f"edgeft-fleet/{WIRE_FORMAT}\n{bundle_sha}\n{run}\n{round_}\n".encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{arr.dtype.str}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.digest()


def sign(key_path: str | os.PathLike, tensors: dict[str, np.ndarray], run: str, round_: int, bundle_sha: str) -> bytes:
    from edgeft.signing import load_private_key

    return load_private_key(key_path).sign(digest(tensors, run, round_, bundle_sha))


def check_signature(
    key_path: str | os.PathLike,
    signature: bytes | None,
    tensors: dict[str, np.ndarray],
    run: str,
    round_: int,
    bundle_sha: str,
) -> None:
    """Refuse (EdgeftError) a global adapter that is unsigned or whose signature does not verify."""
    from cryptography.exceptions import InvalidSignature

    from edgeft.signing import load_public_key

    key = load_public_key(key_path)
    if not signature:
        raise EdgeftError(
            f"round {round_}: the global adapter is unsigned, but a trusted key is configured ({key_path})"
        )
    try:
        key.verify(signature, digest(tensors, run, round_, bundle_sha))
    except InvalidSignature:
        raise EdgeftError(
            f"round {round_}: bad signature on the global adapter under trusted key {key_path} "
            "(altered in transit, or signed with another key)"
        ) from None


def check_update(
    tensors: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
    scaling: dict[str, float],
    tokens,
    max_norm: float | None,
) -> float:
    """Raise :class:`Rejected` unless ``tensors`` has exactly the keys, shapes and dtype of
    ``expected`` (the global the client started from), only finite values, a positive integer
    token count and, with ``max_norm``, a weight-space update norm within it. Returns that norm."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise Rejected(f"wrong keys ({what}; {len(missing)} missing, {len(extra)} unexpected)")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or got.dtype != np.float32:
            raise Rejected(f"{name} is {got.dtype}{list(got.shape)}, expected float32{list(want.shape)}")
        if not np.isfinite(got).all():
            raise Rejected(f"{name} holds NaN or Inf")
    if isinstance(tokens, bool) or not isinstance(tokens, int | float) or tokens != int(tokens) or tokens < 1:
        raise Rejected(f"token count must be a positive integer, got {tokens!r}")
    norm = update_norm(tensors, expected, scaling)
    if not math.isfinite(norm):
        raise Rejected("the update's norm is not finite")
    if max_norm is not None and norm > max_norm:
        raise Rejected(f"update norm {norm:.4g} is above the bound {max_norm:.4g}")
    return norm


def save_stacked(path: Path, bundle: Bundle, tensors: dict[str, np.ndarray], clients: int) -> Path:
    """Write the exact stacked adapter (rank ``clients`` x r per module) as a PEFT directory,
    atomically. Each module keeps the bundle's scaling: r, lora_alpha and the patterns' values are
    multiplied by ``clients`` (lora_alpha by sqrt(clients) under rsLoRA, whose scaling is alpha/sqrt(r))."""
    from safetensors.numpy import save

    from edgeft.device.adapter import CONFIG, WEIGHTS
    from edgeft.fsutil import atomic_write_json, staged_directory, write_bytes

    config = json.loads(bundle.path(bundle.manifest["lora"]["init_adapter"]).joinpath(CONFIG).read_text())
    grow = math.sqrt(clients) if config.get("use_rslora") else clients
    config["r"] = config["r"] * clients
    config["lora_alpha"] = config["lora_alpha"] * grow
    config["rank_pattern"] = {k: v * clients for k, v in (config.get("rank_pattern") or {}).items()}
    config["alpha_pattern"] = {k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()}
    with staged_directory(path) as staging:
        atomic_write_json(staging / CONFIG, config)
        write_bytes(staging / WEIGHTS, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, {"format": "pt"}))
    return path
