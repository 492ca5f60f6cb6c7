"""Bundle trust: ed25519 signatures, full sha256 checks, and graph external-data containment.

* ``edgeft keygen`` makes an ed25519 key pair; ``edgeft export --sign-key`` writes
  ``manifest.json.sig``, a detached signature over the exact bytes of ``manifest.json``. The
  manifest lists every other file's sha256, so the signature covers the whole bundle.
* With a trusted public key (``--trusted-key`` or env ``EDGEFT_TRUSTED_KEY``), ``Bundle.open``
  refuses unsigned bundles, bad signatures, files whose sha256 differs from the manifest and files
  the manifest does not list. Without one it keeps its cheap size check (hashing big bundles is slow).
* Graph files may point at ONNX external data; every ``location`` must be a file the manifest
  lists, inside the bundle. onnxruntime 1.19 (the training build) follows absolute paths, ``..``
  and symlinks out of the model directory, so edgeft checks before any session is created. The
  serving device has no ``onnx`` package: :func:`external_data_locations` reads the protobuf itself.

No torch or onnx here. ``cryptography`` is imported only when a key is used.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from edgeft.errors import EdgeftError
from edgeft.fsutil import _umask, fsync_dir, sha256_file

SIGNATURE = "manifest.json.sig"
MANIFEST = "manifest.json"  # same as edgeft.bundle.MANIFEST (not imported: bundle imports this module)
TRUSTED_KEY_ENV = "EDGEFT_TRUSTED_KEY"
SIGNATURE_SIZE = 64  # raw ed25519 signature


# ---------------------------------------------------------------------------------------------
# Keys


def trusted_key_path(explicit: str | os.PathLike | None = None) -> Path | None:
    """The configured trusted public key: ``explicit``, else env ``EDGEFT_TRUSTED_KEY``, else None."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit)
    env = os.environ.get(TRUSTED_KEY_ENV, "")
    return Path(env) if env else None


def keygen(out: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new ed25519 private key to ``out`` (PEM, 0600) and its public key to ``out.pub``.
    Both are written atomically; an existing file at either path is never replaced."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Path(out)
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if p.exists() or p.is_symlink():
            raise EdgeftError(f"{p}: already exists (refusing to overwrite a key; choose another --out)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _create_new(private, pem, 0o600)
    try:
        _create_new(public, pub, 0o644 & ~_umask())
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private, public


def _create_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temp file, fsync it, then hard-link it to ``path``: atomic, and it fails
    instead of replacing a file that appeared at ``path`` meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise EdgeftError(f"{path}: already exists (refusing to overwrite a key)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    fsync_dir(path.parent)


def _read_key_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        source = f" (from {TRUSTED_KEY_ENV})" if os.environ.get(TRUSTED_KEY_ENV) == str(path) else ""
        raise EdgeftError(f"{path}: {what} not found{source}")
    return path.read_bytes()


def load_private_key(path: str | os.PathLike):
    """An ed25519 private key from a PEM file (as ``edgeft keygen`` writes)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    data = _read_key_file(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        if b"PUBLIC KEY" in data:
            raise EdgeftError(f"{path}: is a public key; sign with the private one") from None
        raise EdgeftError(f"{path}: not an unencrypted PEM private key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgeftError(f"{path}: not an ed25519 key (make one with `edgeft keygen`)")
    return key


def load_public_key(path: str | os.PathLike):
    """An ed25519 public key from a PEM file (``KEYFILE.pub`` from ``edgeft keygen``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    data = _read_key_file(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        if b"PRIVATE KEY" in data:
            raise EdgeftError(f"{path}: is a private key; pass the public one (KEYFILE.pub)") from None
        raise EdgeftError(f"{path}: not a PEM public key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgeftError(f"{path}: not an ed25519 public key (make one with `edgeft keygen`)")
    return key


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---------------------------------------------------------------------------------------------
# Signatures


def sign_bundle(root: str | os.PathLike, key) -> Path:
    """Write ``root/manifest.json.sig`` over the current ``manifest.json``; ``key`` is a key file
    path or a loaded ed25519 private key."""
    from edgeft.fsutil import atomic_write_bytes

    root = Path(root)
    if isinstance(key, str | os.PathLike):
        key = load_private_key(key)
    sig = root / SIGNATURE
    atomic_write_bytes(sig, key.sign((root / MANIFEST).read_bytes()))
    return sig


def check_signature(root: str | os.PathLike, key_path: str | os.PathLike) -> bytes:
    """Refuse ``root`` unless ``manifest.json.sig`` is a valid signature of ``manifest.json`` by the
    public key in ``key_path``; return the manifest bytes that were verified."""
    from cryptography.exceptions import InvalidSignature

    root, key_path = Path(root), Path(key_path)
    key = load_public_key(key_path)
    sig = root / SIGNATURE
    if not sig.is_file():
        raise EdgeftError(f"{sig}: not found: the bundle is unsigned, but a trusted key is configured ({key_path})")
    signature = sig.read_bytes()
    manifest = (root / MANIFEST).read_bytes()
    try:
        if len(signature) != SIGNATURE_SIZE:
            raise InvalidSignature
        key.verify(signature, manifest)
    except InvalidSignature:
        raise EdgeftError(
            f"{sig}: bad signature for {MANIFEST} under trusted key {key_path} "
            "(the bundle was modified or signed with another key)"
        ) from None
    return manifest


# ---------------------------------------------------------------------------------------------
# Full file checks


def check_hashes(root: str | os.PathLike, manifest: dict) -> int:
    """Recompute every listed file's size and sha256; raise naming the first that differs.
    Returns the number of files checked."""
    root = Path(root)
    for rel, meta in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise EdgeftError(f"{p}: missing from the bundle (listed in {MANIFEST})")
        if p.stat().st_size != meta["size"]:
            raise EdgeftError(f"{p}: size {p.stat().st_size} differs from {meta['size']} in {MANIFEST}")
        if sha256_file(p) != meta["sha256"]:
            raise EdgeftError(f"{p}: sha256 differs from {MANIFEST} (the file was modified)")
    return len(manifest["files"])


def unlisted_files(root: str | os.PathLike, manifest: dict) -> list[str]:
    """Files (and links) in the bundle that ``manifest.files`` does not list, sorted."""
    root = Path(root)
    listed = set(manifest["files"]) | {MANIFEST, SIGNATURE}
    found = []
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            rel = Path(dirpath, name).relative_to(root).as_posix()
            if rel not in listed:
                found.append(rel)
    return sorted(found)


def check_unlisted(root: str | os.PathLike, manifest: dict) -> None:
    extra = unlisted_files(root, manifest)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise EdgeftError(f"{Path(root)}: files not listed in {MANIFEST}: {shown}")


def verify_bundle(path: str | os.PathLike, trusted_key: str | os.PathLike | None = None) -> str:
    """``edgeft verify``: manifest, every file's sha256, no unlisted files and, with a trusted key,
    the signature. Returns the one-line summary; raises EdgeftError on the first problem."""
    from edgeft.bundle import Bundle

    key = trusted_key_path(trusted_key)
    bundle = Bundle.open(path, trusted_key=key)  # with a key: signature, hashes, unlisted files
    if key is None:
        check_hashes(bundle.root, bundle.manifest)
        check_unlisted(bundle.root, bundle.manifest)
    count = len(bundle.manifest["files"])
    if key is not None:
        sig = f"signature valid (trusted key {key})"
    elif (bundle.root / SIGNATURE).is_file():
        sig = "signed, signature not checked (no --trusted-key)"
    else:
        sig = "unsigned"
    return f"OK {bundle.root}: {count} files match {MANIFEST} (sha256), no unlisted files, {sig}"


# ---------------------------------------------------------------------------------------------
# Graph external data


def check_external_data(root: str | os.PathLike, manifest: dict) -> None:
    """Every external-data ``location`` in the manifest's graph files must be a relative path,
    without ``..``, naming a file the manifest lists, that resolves inside the bundle."""
    root = Path(root)
    inside = root.resolve()
    for graph in manifest["graphs"].values():
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str):
            continue
        path = root / graph["file"]
        if not path.is_file():
            raise EdgeftError(f"{path}: missing from the bundle (a graph file named in {MANIFEST})")
        for location in sorted(set(external_data_locations(path))):
            where = f"{path}: external data location {location!r}"
            pure = PurePosixPath(location.replace("\\", "/"))
            if pure.is_absolute() or location.startswith(("\\", "/")) or ":" in location:
                raise EdgeftError(f"{where} is an absolute path; external data must stay inside the bundle")
            if ".." in pure.parts:
                raise EdgeftError(f"{where} leaves the bundle ('..'); external data must stay inside it")
            if location not in manifest["files"]:
                raise EdgeftError(f"{where} is not a file listed in {MANIFEST}")
            target = (root / location).resolve()
            if not target.is_relative_to(inside):
                raise EdgeftError(f"{where} resolves outside the bundle ({target})")


# The messages and fields that can hold a TensorProto, with their field numbers (onnx.proto).
_MODEL, _GRAPH, _NODE, _ATTR, _TENSOR, _SPARSE, _TRAINING, _FUNCTION = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _FUNCTION: {7: _NODE, 11: _ATTR},
}
_TENSOR_EXTERNAL_DATA = 13
_MAX_DEPTH = 64  # nested subgraphs; far beyond any real model, and keeps recursion bounded


def external_data_locations(path: str | os.PathLike) -> list[str]:
    """The ``location`` values of every tensor's ``external_data`` in an ONNX model file:
    initializers, sparse initializers, node attribute tensors, subgraphs, training info and
    functions. A minimal protobuf reader, so the serving device needs no ``onnx`` package."""
    path = Path(path)
    data = path.read_bytes()  # graph files hold no weights: small
    # Every location ORT follows is an entry with the key "location", stored verbatim: a graph
    # without these bytes has no external data (the usual case for the training graphs).
    if b"location" not in data:
        return []
    try:
        return list(_walk(memoryview(data), _MODEL, 0))
    except IndexError:
        raise EdgeftError(f"{path}: not a valid ONNX model (truncated)") from None
    except ValueError as e:
        raise EdgeftError(f"{path}: not a valid ONNX model ({e})") from None


def _walk(buf: memoryview, kind: int, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise ValueError("graphs nested too deeply")
    children = _CHILDREN.get(kind, {})
    for number, value in _fields(buf):
        if kind == _TENSOR:
            if number == _TENSOR_EXTERNAL_DATA and value is not None:
                entry = dict(_fields(value))
                key, val = entry.get(1), entry.get(2)
                if key is not None and bytes(key) == b"location":
                    yield bytes(val or b"").decode("utf-8", errors="replace")
        elif number in children and value is not None:
            yield from _walk(value, children[number], depth + 1)


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, bytes of a length-delimited value or None) for each field of a message."""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            value = None
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError(f"field {number} runs past the end of its message")
            value = buf[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
            value = None
        elif wire == 5:
            pos += 4
            value = None
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, value


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]  # IndexError at the end of the data: truncated
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")
