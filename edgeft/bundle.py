"""The bundle contract shared by host and device: file names, manifest checks, parameter layout.

The format is written down in ``artifacts/SPEC.md`` and ``artifacts/manifest.schema.json``.
No torch, transformers, peft or onnx here: the device imports this module.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from edgeft.errors import EdgeftError
from edgeft.fsutil import sha256_file

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
GRAPH_INPUTS = ("input_ids", "attention_mask", "labels", "num_loss_tokens")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
QUANT_SCHEMES = ("int8", "int4")  # export --quantize (edgeft/host/quantize.py)
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
# Export's default loss-head chunk (edgeft/host/losshead.py): this many bytes of float32 logits, at
# least 128 rows. Smaller chunks save memory but pack lm_head's weight for more, smaller products
# (measured, vocab 128256, 1020 rows: 128-row chunks 843 MB / +9 % step, 256 rows 1126 MB / +3 %,
# whole 2162 MB).
LOSS_CHUNK_BYTES = 128 << 20


def loss_chunk_rows(vocab: int) -> int:
    """Rows per chunk of the loss head by default: LOSS_CHUNK_BYTES of logits, a multiple of 8."""
    return max(128, (LOSS_CHUNK_BYTES // (4 * vocab)) // 8 * 8)


def peft_key(onnx_name: str) -> str:
    """ONNX/PEFT parameter name -> PEFT state-dict key (the adapter name ``default`` is dropped;
    DoRA's ``….lora_magnitude_vector.default.weight`` is saved by PEFT as ``….lora_magnitude_vector``;
    a classification head's ``….classifier.modules_to_save.default.weight`` as ``….classifier.weight``)."""
    name = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude_vector", onnx_name)
    name = re.sub(r"\.modules_to_save\.default\.", ".", name)
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", name)


def is_head(onnx_name: str) -> bool:
    """A tensor of a module PEFT trains in full (``modules_to_save``: a classification head)."""
    return ".modules_to_save." in onnx_name


def lora_module(name: str) -> str:
    """The LoRA module of a trainable parameter (ONNX name or PEFT key): the part before ``.lora_``,
    e.g. ``base_model.model.model.layers.0.self_attn.q_proj``."""
    return name.split(".lora_", 1)[0]


def read_safetensors_header(path: Path) -> tuple[bytes, dict]:
    """The raw header (u64 little-endian size + JSON) of a safetensors file and the parsed JSON.
    Tensor data offsets in it are relative to the end of those raw bytes."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ValueError("file shorter than 8 bytes")
            (size,) = struct.unpack("<Q", prefix)
            if size > Path(path).stat().st_size - 8:
                raise ValueError(f"header size {size} exceeds the file")
            raw = f.read(size)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EdgeftError(f"{path}: not a valid safetensors file ({e})") from None
    return prefix + raw, header


def safetensors_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute (offset, length) in the file of every tensor of a safetensors file: what ONNX
    external data needs to point at it."""
    raw, header = read_safetensors_header(path)
    return {
        k: (len(raw) + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
        for k, v in header.items()
        if k != "__metadata__"
    }


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file in the bundle except the manifest and its signature."""
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in (MANIFEST, MANIFEST + ".sig"):
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


@dataclass
class Bundle:
    """A bundle directory with its validated manifest."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | os.PathLike, trusted_key: str | os.PathLike | None = None) -> Bundle:
        """Open and check a bundle. ``trusted_key``: a public key file (default: env
        ``EDGEFT_TRUSTED_KEY``); with one, the bundle must be signed by it and every file's sha256
        must match the manifest (see ``edgeft/signing.py``). Without one, sizes only (cheap)."""
        from edgeft import signing

        root = Path(path)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise EdgeftError(f"{root}: bundle directory not found")
        if not mpath.is_file():
            raise EdgeftError(f"{mpath}: not found (is {root} an edgeft bundle?)")
        key = signing.trusted_key_path(trusted_key)
        # With a key, the bytes parsed are the bytes whose signature was checked.
        raw = signing.check_signature(root, key) if key is not None else mpath.read_bytes()
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EdgeftError(f"{mpath}: invalid JSON ({e})") from None
        validate_manifest(manifest, mpath)
        bundle = cls(root, manifest)
        bundle.check_files()
        if key is not None:
            signing.check_hashes(root, manifest)
            signing.check_unlisted(root, manifest)
        signing.check_external_data(root, manifest)
        return bundle

    def path(self, rel: str) -> Path:
        return self.root / rel

    def copy_files(self, directory: Path, required: tuple[str, ...], optional: tuple[str, ...], user: str) -> None:
        """Copy these bundle files into ``directory``; a missing required one is an error naming ``user``."""
        import shutil

        for name in required + optional:
            src = self.path(name)
            if src.is_file():
                shutil.copyfile(src, directory / name)
            elif name in required:
                raise EdgeftError(f"{src}: missing from the bundle ({user} needs it)")

    def check_files(self) -> None:
        """Cheap integrity check on every open: each listed file exists with its recorded size,
        inside the bundle (no symlink leading out)."""
        inside = self.root.resolve()
        for rel, meta in self.manifest["files"].items():
            p = self.root / rel
            if not p.is_file():
                raise EdgeftError(f"{p}: missing from the bundle (listed in {MANIFEST})")
            if not p.resolve().is_relative_to(inside):
                raise EdgeftError(f"{p}: a symlink leading outside the bundle (to {p.resolve()})")
            if p.stat().st_size != meta["size"]:
                raise EdgeftError(f"{p}: size {p.stat().st_size} differs from {meta['size']} in {MANIFEST}")

    @cached_property
    def trainable(self) -> list[dict]:
        return [p for p in self.manifest["parameters"] if p["trainable"]]

    @cached_property
    def frozen(self) -> list[dict]:
        return [p for p in self.manifest["parameters"] if not p["trainable"]]

    @property
    def max_seq_len(self) -> int:
        return self.manifest["max_seq_len"]

    def seq_len(self, requested: int | None) -> int:
        """The sequence limit to use: ``requested`` if given and within the bundle's own limit."""
        if requested is None:
            return self.max_seq_len
        if not 2 <= requested <= self.max_seq_len:
            raise EdgeftError(f"--max-seq-len must be between 2 and the bundle's max_seq_len {self.max_seq_len}")
        return requested


def validate_manifest(manifest: dict, where: Path) -> None:
    """Version gate first (a clear message for newer bundles), then the JSON schema."""
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise EdgeftError(
            f"{where}: bundle format_version {version} is newer than this edgeft supports "
            f"({FORMAT_VERSION}); upgrade edgeft on this device"
        )
    if isinstance(version, int) and 1 <= version < FORMAT_VERSION:
        raise EdgeftError(
            f"{where}: bundle format_version {version} was written for the onnxruntime-training engine; "
            f"re-export it with this edgeft (edgeft export MODEL_DIR --out BUNDLE) to get format {FORMAT_VERSION}"
        )
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        field = "/".join(str(p) for p in err.path) or "(top level)"
        raise EdgeftError(f"{where}: field {field}: {err.message}")
    schemes = {p["quantized"]["scheme"] for p in manifest["parameters"] if "quantized" in p}
    schemes |= {manifest["quantization"]["scheme"]} if "quantization" in manifest else set()
    unknown = sorted(schemes - set(QUANT_SCHEMES))
    if unknown:
        raise EdgeftError(
            f"{where}: the base weights are quantized as {unknown[0]!r}, which this edgeft does not support "
            f"({', '.join(QUANT_SCHEMES)}); upgrade edgeft on this device"
        )
