"""Signed bundles: keygen, export --sign-key, verify, and --trusted-key / EDGEFT_TRUSTED_KEY on
every command that opens a bundle; plus the protobuf reader behind the external-data check."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli_errors import GOOD

from edgeft import signing
from edgeft.bundle import Bundle
from edgeft.cli import main
from edgeft.errors import EdgeftError
from edgeft.signing import SIGNATURE, external_data_locations, keygen, sign_bundle


def run(*args, env: dict | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def refused(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def flip_byte(path: Path, at: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def _no_ambient_key(monkeypatch):
    monkeypatch.delenv(signing.TRUSTED_KEY_ENV, raising=False)


@pytest.fixture(scope="module")
def keypair(tmp_path_factory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys") / "edgeft.key")


@pytest.fixture
def signed(tmp_path, llama_bundle, keypair) -> Path:
    bundle = tmp_path / "signed"
    shutil.copytree(llama_bundle, bundle)
    sign_bundle(bundle, keypair[0])
    return bundle


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(GOOD) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Keys


def test_keygen_writes_a_private_and_a_public_key(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    result = run("keygen", "--out", tmp_path / "k" / "signer.key")
    assert result.exit_code == 0, result.stderr
    private, public = tmp_path / "k" / "signer.key", tmp_path / "k" / "signer.key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert isinstance(signing.load_private_key(private), Ed25519PrivateKey)
    assert isinstance(signing.load_public_key(public), Ed25519PublicKey)
    assert sorted(p.name for p in private.parent.iterdir()) == ["signer.key", "signer.key.pub"]  # no temp files


def test_keygen_refuses_to_overwrite(tmp_path):
    private, public = keygen(tmp_path / "signer.key")
    before = (private.read_bytes(), public.read_bytes())
    refused(run("keygen", "--out", private), str(private), "already exists")
    assert (private.read_bytes(), public.read_bytes()) == before


# ---------------------------------------------------------------------------------------------
# Export, verify


def test_export_sign_key_signs_inside_the_bundle(tmp_path, factory, keypair):
    """A real ``edgeft export --sign-key`` (nothing mocked): the signature covers the final
    manifest, ``verify`` accepts the bundle under the public key, and it loads and generates."""
    private, public = keypair
    out = tmp_path / "bundle"
    result = run("export", factory.model("llama"), "--out", out, "--max-seq-len", "128", "--sign-key", private)
    assert result.exit_code == 0, (result.stderr, result.exception)
    sig = out / SIGNATURE
    assert sig.is_file() and len(sig.read_bytes()) == 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert SIGNATURE not in manifest["files"]  # the signature covers the manifest, not itself
    signing.load_public_key(public).verify(sig.read_bytes(), (out / "manifest.json").read_bytes())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left
    ok = run("verify", out, "--trusted-key", public)
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.startswith("OK ") and "signature valid" in ok.stdout and ok.stdout.count("\n") == 1
    assert f"{len(manifest['files'])} files match" in ok.stdout
    generated = run("generate", out, "--prompt", "hi", "--max-new-tokens", "2", "--trusted-key", public)
    assert generated.exit_code == 0, (generated.stderr, generated.exception)
    assert generated.stdout.strip()


def test_verify_without_key_checks_every_hash(llama_bundle):
    ok = run("verify", llama_bundle)
    assert ok.exit_code == 0, ok.stderr
    count = len(json.loads((llama_bundle / "manifest.json").read_text())["files"])
    assert f"{count} files match" in ok.stdout and "unsigned" in ok.stdout


def test_sign_verify_tamper_and_every_command_refuses(signed, keypair, data, tmp_path):
    pub = keypair[1]
    assert run("verify", signed, "--trusted-key", pub).exit_code == 0
    weights = signed / "weights.safetensors"
    size = weights.stat().st_size
    flip_byte(weights)
    assert weights.stat().st_size == size
    name = str(weights)
    refused(run("verify", signed, "--trusted-key", pub), name, "sha256")
    refused(run("verify", signed), name, "sha256")  # verify hashes even without a key
    out = tmp_path / "run"
    refused(run("train", signed, "--data", data, "--out", out, "--no-progress", "--trusted-key", pub), name)
    assert not out.exists()
    refused(run("eval", signed, "--data", data, "--trusted-key", pub), name, "sha256")
    refused(run("generate", signed, "--prompt", "hi", "--max-new-tokens", "1", "--trusted-key", pub), name)
    refused(run("plan", signed, "--trusted-key", pub), name)
    # Without a key only sizes are checked (cheap), so the same-size edit is not noticed on open.
    assert Bundle.open(signed).root == signed


def test_signed_bundle_is_accepted(signed, keypair, data):
    result = run("eval", signed, "--data", data, "--trusted-key", keypair[1])
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "loss" in json.loads(result.stdout)
    result = run("generate", signed, "--prompt", "hi", "--max-new-tokens", "2", "--trusted-key", keypair[1])
    assert result.exit_code == 0, (result.stderr, result.exception)


def test_unsigned_bundle_is_refused_under_a_trusted_key(llama_bundle, keypair, data):
    refused(run("eval", llama_bundle, "--data", data, "--trusted-key", keypair[1]), SIGNATURE, "unsigned")


def test_wrong_key_is_refused(signed, tmp_path, data):
    _, other = keygen(tmp_path / "other.key")
    refused(run("eval", signed, "--data", data, "--trusted-key", other), str(signed / SIGNATURE), "bad signature")


def test_env_trusted_key(signed, llama_bundle, keypair, data):
    env = {signing.TRUSTED_KEY_ENV: str(keypair[1])}
    refused(run("eval", llama_bundle, "--data", data, env=env), "unsigned")
    assert run("plan", signed, env=env).exit_code == 0
    flip_byte(signed / "tokenizer.json", at=50)
    refused(run("plan", signed, env=env), str(signed / "tokenizer.json"), "sha256")
    ok = run("verify", llama_bundle, env={signing.TRUSTED_KEY_ENV: ""})  # empty: no key
    assert ok.exit_code == 0, ok.stderr


def test_hashing_happens_only_with_a_key(signed, keypair, monkeypatch):
    calls = []
    real = signing.sha256_file
    monkeypatch.setattr(signing, "sha256_file", lambda p: calls.append(p) or real(p))
    Bundle.open(signed)
    assert calls == []
    Bundle.open(signed, trusted_key=keypair[1])
    manifest = json.loads((signed / "manifest.json").read_text())
    assert sorted(Path(p).relative_to(signed).as_posix() for p in calls) == sorted(manifest["files"])


# ---------------------------------------------------------------------------------------------
# The external-data reader (no onnx needed on the device)


def test_reader_matches_onnx_on_the_bundle_graphs(llama_bundle):
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    manifest = json.loads((llama_bundle / "manifest.json").read_text())
    seen = set()
    for graph in manifest["graphs"].values():
        path = llama_bundle / graph["file"]
        model = onnx.load(str(path), load_external_data=False)
        expected = [e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"]
        assert external_data_locations(path) == expected
        seen.update(expected)
    assert seen == {"weights.safetensors"}  # the decoders' weights; the training graphs have none


def test_reader_finds_locations_in_every_place_a_tensor_can_be(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    def ext(name: str, location: str) -> TensorProto:
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
        for key, value in (("offset", "0"), ("location", location), ("length", "4")):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    inner = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=ext("c", "in-subgraph-constant"))], "inner", [], [y]
    )
    nodes = [
        helper.make_node("Constant", [], ["k"], value=ext("k", "constant-attribute")),
        helper.make_node("If", ["x"], ["y"], then_branch=inner, else_branch=inner),
    ]
    sparse = onnx.SparseTensorProto(values=ext("sv", "sparse-values"), dims=[4])
    sparse.indices.CopyFrom(helper.make_tensor("si", TensorProto.INT64, [1], [0]))
    graph = helper.make_graph(nodes, "g", [x], [y], [ext("W", "initializer")], sparse_initializer=[sparse])
    model = helper.make_model(graph)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert sorted(external_data_locations(path)) == sorted(
        ["initializer", "sparse-values", "constant-attribute", "in-subgraph-constant", "in-subgraph-constant"]
    )
    path.write_bytes(model.SerializeToString()[:-3])
    with pytest.raises(EdgeftError, match="not a valid ONNX model"):
        external_data_locations(path)


def test_device_venv_verifies_and_refuses_escaping_data_without_onnx(signed, keypair, tmp_path):
    """The device venv has neither torch nor onnx: signing and the protobuf reader still work."""
    venv = os.environ.get("EDGEFT_DEVICE_VENV")
    if not venv:
        pytest.skip("EDGEFT_DEVICE_VENV not set (make test sets it)")
    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(signed, bad)
    model = onnx.load(str(bad / "decoder_lora.onnx"), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "location")
    entry.value = "../weights.safetensors"
    (bad / "decoder_lora.onnx").write_bytes(model.SerializeToString())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["decoder_lora.onnx"] = {
        "sha256": signing.sha256_file(bad / "decoder_lora.onnx"),
        "size": (bad / "decoder_lora.onnx").stat().st_size,
    }
    (bad / "manifest.json").write_text(json.dumps(manifest))
    script = (
        "import sys, importlib.util\n"
        "assert importlib.util.find_spec('onnx') is None and importlib.util.find_spec('torch') is None\n"
        "from edgeft.errors import EdgeftError\n"
        "from edgeft.signing import verify_bundle\n"
        "from edgeft.bundle import Bundle\n"
        "print(verify_bundle(sys.argv[1], sys.argv[2]))\n"
        "try:\n"
        "    Bundle.open(sys.argv[3])\n"
        "except EdgeftError as e:\n"
        "    print('refused:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != signing.TRUSTED_KEY_ENV}
    proc = subprocess.run(
        [str(Path(venv) / "bin" / "python"), "-c", script, str(signed), str(keypair[1]), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert first.startswith("OK ") and "signature valid" in first
    assert second.startswith("refused:") and "'../weights.safetensors'" in second and "leaves the bundle" in second
