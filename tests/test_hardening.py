"""Hostile and malformed inputs, table-driven: data files, bundles, adapters, manifests, CLI options
and HTTP requests. Every CLI case must end with exit code 2 and one ``error: ...`` line naming the
problem; every HTTP case with the expected status and an OpenAI-style error; and in both, nothing
on disk changed (every watched directory is hashed before and after, with
``test_cli_errors.snapshot``).

What onnxruntime itself does with an ONNX external-data ``location`` that leaves the model's
directory (checked by ``test_ort_external_data_behaviour`` below):

* onnxruntime-training 1.19.2 (the device build): an absolute path, ``../secret.bin`` and a
  symlink inside the model directory pointing outside are all **followed**: the session loads
  and the tensor holds the outside file's bytes. (``sub/../../x`` fails only because the OS
  resolves ``sub`` first and it does not exist.)
* onnxruntime 1.32 (the serving build): all three are **refused** when the session is created,
  ``External data path validation failed ... Absolute path not allowed`` /
  ``... escapes model directory``.

So edgeft checks every graph's external-data locations itself in ``Bundle.open`` (with a
protobuf reader of its own, as the serving device has no ``onnx`` package): a location must be a
relative path without ``..``, name a file the manifest lists, and resolve inside the bundle.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli_errors import GOOD, Env, assert_refused, snapshot

from edgeft.cli import main
from edgeft.fsutil import sha256_file
from edgeft.signing import SIGNATURE, keygen, sign_bundle

# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Case:
    args: list
    expect: list[str]  # substrings the error line must contain
    out: Path | None = None  # a path the command must not create
    watch: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Keys:
    private: Path
    public: Path
    other_public: Path  # a valid key that did not sign anything
    signed: Path  # the llama bundle, signed with ``private`` (read-only)


@dataclass
class HEnv(Env):
    keys: Keys | None = None
    outside: Path | None = None  # a directory beside the bundle copies, for files "outside"

    def signed(self, name: str = "signed") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.keys.signed, dst)
        return dst

    def relist(self, bundle: Path, *rels: str) -> None:
        """Record new sizes/hashes of ``rels`` in the manifest, as an attacker would."""
        path = bundle / "manifest.json"
        manifest = json.loads(path.read_text())
        for rel in rels:
            p = bundle / rel
            manifest["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        path.write_text(json.dumps(manifest, indent=2))

    def secret(self) -> Path:
        self.outside.mkdir(exist_ok=True)
        secret = self.outside / "secret.bin"
        secret.write_bytes(b"\x00" * 4096)
        return secret


def flip_byte(path: Path, at: int = -9) -> None:
    """Change one byte, keep the size: only a sha256 check can tell."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def external(bundle: Path, graph: str, location: str) -> None:
    """Point the first initializer of ``graph`` at external data in ``location``."""
    import onnx

    model = onnx.load(str(bundle / graph), load_external_data=False)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (bundle / graph).write_bytes(model.SerializeToString())


def _eval(env: HEnv, bundle: Path | None = None, *extra, data: Path | None = None) -> list:
    return ["eval", bundle or env.bundle, "--data", data or env.good_data(), *extra]


def _train(env: HEnv, bundle: Path | None = None, *extra, data: Path | None = None) -> tuple[list, Path]:
    out = env.tmp / "run"
    return [
        "train",
        bundle or env.bundle,
        "--data",
        data or env.good_data(),
        "--out",
        out,
        "--no-progress",
        *extra,
    ], out


def _generate(env: HEnv, bundle: Path | None = None, *extra) -> list:
    return ["generate", bundle or env.bundle, "--prompt", "hello", "--max-new-tokens", "2", *extra]


def _key(env: HEnv) -> list:
    return ["--trusted-key", env.keys.public]


# ---------------------------------------------------------------------------------------------
# Cases: data files


def data_nul_bytes(env: HEnv) -> Case:
    data = env.data(GOOD[0], b"\x00\x00\x00\x00")
    return Case(_eval(env, data=data), [f"{data}:2:", "invalid JSON"])


def data_number_line(env: HEnv) -> Case:
    data = env.data(GOOD[0], "42")
    return Case(_eval(env, data=data), [f"{data}:2:", "JSON object"])


def data_text_not_string(env: HEnv) -> Case:
    data = env.data(GOOD[0], '{"text": 5}')
    return Case(_eval(env, data=data), [f"{data}:2:", "'text'", "string"])


def data_text_empty(env: HEnv) -> Case:
    data = env.data('{"text": ""}')
    return Case(_eval(env, data=data), [f"{data}:1:", "'text' is empty"])


def data_messages_not_list(env: HEnv) -> Case:
    data = env.data(json.dumps({"messages": "hi"}))
    return Case(_eval(env, data=data), [f"{data}:1:", "messages"])


def data_content_not_string(env: HEnv) -> Case:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": {"x": 1}}]
    data = env.data(json.dumps({"messages": msgs}))
    return Case(_eval(env, data=data), [f"{data}:1:", "content"])


def data_symlink_to_missing(env: HEnv) -> Case:
    link = env.tmp / "data.jsonl"
    link.symlink_to(env.tmp / "gone.jsonl")
    return Case(_eval(env, data=link), [str(link), "not found"])


def train_data_utf16(env: HEnv) -> Case:
    data = env.tmp / "utf16.jsonl"
    data.write_bytes(GOOD[0].encode("utf-16"))
    args, out = _train(env, data=data)
    return Case(args, [f"{data}:1:", "UTF-8"], out)


# ---------------------------------------------------------------------------------------------
# Cases: bundles


def bundle_tampered_weights_same_size(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "weights.safetensors")
    return Case(_eval(env, bundle, *_key(env)), [str(bundle / "weights.safetensors"), "sha256"])


def bundle_tampered_tokenizer_same_size(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "tokenizer.json", at=100)
    return Case(_generate(env, bundle, *_key(env)), [str(bundle / "tokenizer.json"), "sha256"])


def bundle_tampered_init_adapter(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "adapter" / "adapter_model.safetensors")
    args, out = _train(env, bundle, *_key(env))
    return Case(args, [str(bundle / "adapter" / "adapter_model.safetensors"), "sha256"], out)


def bundle_tampered_graph(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "training_model.onnx", at=len((bundle / "training_model.onnx").read_bytes()) // 2)
    args, out = _train(env, bundle, *_key(env))
    return Case(args, [str(bundle / "training_model.onnx"), "sha256"], out)


def bundle_extra_file_signed(env: HEnv) -> Case:
    bundle = env.signed()
    (bundle / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    return Case(_eval(env, bundle, *_key(env)), ["not listed in manifest.json", "adapter/adapter_model.bin"])


def bundle_manifest_edited_after_signing(env: HEnv) -> Case:
    bundle = env.signed()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["max_seq_len"] = 64
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Case(_eval(env, bundle, *_key(env)), [str(bundle / SIGNATURE), "bad signature"])


def bundle_resigned_by_attacker(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "weights.safetensors")
    env.relist(bundle, "weights.safetensors")
    attacker, _ = keygen(env.tmp / "attacker.key")
    sign_bundle(bundle, attacker)
    return Case(_generate(env, bundle, *_key(env)), ["bad signature", str(env.keys.public)])


def bundle_signature_truncated(env: HEnv) -> Case:
    bundle = env.signed()
    (bundle / SIGNATURE).write_bytes((bundle / SIGNATURE).read_bytes()[:32])
    return Case(_eval(env, bundle, *_key(env)), [SIGNATURE, "bad signature"])


def bundle_unsigned_with_key(env: HEnv) -> Case:
    return Case(_eval(env, None, *_key(env)), [SIGNATURE, "unsigned", str(env.keys.public)])


def bundle_wrong_key(env: HEnv) -> Case:
    return Case(_eval(env, env.keys.signed, "--trusted-key", env.keys.other_public), ["bad signature"])


def bundle_unsigned_env_key(env: HEnv) -> Case:
    return Case(_eval(env), [SIGNATURE, "unsigned"], env={"EDGEFT_TRUSTED_KEY": str(env.keys.public)})


def bundle_swapped_graph(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    shutil.copyfile(bundle / "decoder.onnx", bundle / "decoder_lora.onnx")
    return Case(_generate(env, bundle), [str(bundle / "decoder_lora.onnx"), "size"])


def bundle_swapped_graph_relisted_signed(env: HEnv) -> Case:
    bundle = env.signed()
    shutil.copyfile(bundle / "eval_model.onnx", bundle / "training_model.onnx")
    env.relist(bundle, "training_model.onnx")
    args, out = _train(env, bundle, *_key(env))
    return Case(args, ["bad signature"], out)


def bundle_external_data_dotdot(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    env.secret()
    external(bundle, "decoder_lora.onnx", "../outside/secret.bin")
    env.relist(bundle, "decoder_lora.onnx")
    return Case(_generate(env, bundle), ["decoder_lora.onnx", "'../outside/secret.bin'", "leaves the bundle"])


def bundle_external_data_absolute(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    secret = env.secret()
    external(bundle, "decoder.onnx", str(secret))
    env.relist(bundle, "decoder.onnx")
    return Case(["merge", bundle, "--adapter", bundle / "adapter", "--out", env.tmp / "merged"],
                ["decoder.onnx", str(secret), "absolute"], env.tmp / "merged")  # fmt: skip


def bundle_external_data_training_graph(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    env.secret()
    external(bundle, "training_model.onnx", "adapter/../../outside/secret.bin")
    env.relist(bundle, "training_model.onnx")
    args, out = _train(env, bundle)
    return Case(args, ["training_model.onnx", "leaves the bundle"], out)


def bundle_external_data_unlisted_symlink(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    (bundle / "extra.bin").symlink_to(env.secret())
    external(bundle, "decoder_lora.onnx", "extra.bin")
    env.relist(bundle, "decoder_lora.onnx")
    return Case(_eval(env, bundle), ["decoder_lora.onnx", "'extra.bin'", "not a file listed"])


def bundle_external_data_listed_symlink(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    (bundle / "extra.bin").symlink_to(env.secret())
    external(bundle, "decoder_lora.onnx", "extra.bin")
    env.relist(bundle, "decoder_lora.onnx", "extra.bin")
    return Case(_eval(env, bundle), [str(bundle / "extra.bin"), "outside the bundle"])


def bundle_external_data_backslash(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    external(bundle, "decoder_lora.onnx", "..\\outside\\secret.bin")
    env.relist(bundle, "decoder_lora.onnx")
    return Case(_generate(env, bundle), ["decoder_lora.onnx", "leaves the bundle"])


def bundle_graph_truncated_protobuf(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    graph = bundle / "decoder_lora.onnx"
    graph.write_bytes(graph.read_bytes()[:-7])
    env.relist(bundle, "decoder_lora.onnx")
    return Case(_generate(env, bundle), [str(graph), "not a valid ONNX model"])


def bundle_symlink_to_outside(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    env.outside.mkdir(exist_ok=True)
    copy = env.outside / "tokenizer.json"
    shutil.copyfile(bundle / "tokenizer.json", copy)  # same bytes: sizes and even sha256 match
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to(copy)
    return Case(_eval(env, bundle), [str(bundle / "tokenizer.json"), "symlink leading outside"])


def bundle_symlinked_dir_to_outside(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    env.outside.mkdir(exist_ok=True)
    shutil.move(bundle / "adapter", env.outside / "adapter")
    (bundle / "adapter").symlink_to(env.outside / "adapter")
    args, out = _train(env, bundle)
    return Case(args, [str(bundle / "adapter"), "symlink leading outside"], out)


def bundle_listed_file_is_directory(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    (bundle / "config.json").unlink()
    (bundle / "config.json").mkdir()
    return Case(["plan", bundle], [str(bundle / "config.json"), "missing"])


def bundle_path_is_a_file(env: HEnv) -> Case:
    path = env.tmp / "bundle.tar"
    path.write_bytes(b"not a directory")
    return Case(["plan", path], [str(path), "bundle directory not found"])


# ---------------------------------------------------------------------------------------------
# Cases: manifests (path fields must stay inside the bundle: the schema's relpath)


def _manifest_case(env: HEnv, edit: Callable[[dict], None], expect: list[str]) -> Case:
    bundle = env.edit_manifest(edit)
    return Case(_eval(env, bundle), ["manifest.json", *expect])


def manifest_files_dotdot(env: HEnv) -> Case:
    def edit(m):
        m["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}

    return _manifest_case(env, edit, ["field files", "../outside.txt"])


def manifest_files_absolute(env: HEnv) -> Case:
    def edit(m):
        m["files"]["/etc/hostname"] = {"sha256": "0" * 64, "size": 1}

    return _manifest_case(env, edit, ["field files", "/etc/hostname"])


def manifest_files_backslash(env: HEnv) -> Case:
    def edit(m):
        m["files"]["adapter\\..\\..\\x"] = {"sha256": "0" * 64, "size": 1}

    return _manifest_case(env, edit, ["field files"])


def manifest_weights_dotdot(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m.update(weights="../weights.safetensors"), ["field weights"])


def manifest_weights_absolute(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m.update(weights="/tmp/weights.safetensors"), ["field weights"])


def manifest_gradient_map_not_strings(env: HEnv) -> Case:
    return _manifest_case(
        env, lambda m: m["graphs"]["training"].update(gradients={"x": 3}), ["field graphs/training/gradients/x"]
    )


def manifest_graph_file_dotdot(env: HEnv) -> Case:
    return _manifest_case(
        env, lambda m: m["graphs"]["training"].update(file="../training_model.onnx"), ["field graphs/training/file"]
    )


def manifest_decoder_file_absolute(env: HEnv) -> Case:
    return _manifest_case(
        env, lambda m: m["graphs"]["decoder_lora"].update(file="/tmp/x.onnx"), ["field graphs/decoder_lora/file"]
    )


def manifest_init_adapter_dotdot(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m["lora"].update(init_adapter=".."), ["field lora/init_adapter"])


def manifest_tokenizer_file_dotdot(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m["tokenizer"].update(files=["../tokenizer.json"]), ["field tokenizer/files"])


def manifest_sha256_not_hex(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m["files"]["config.json"].update(sha256="zz"), ["config.json", "sha256"])


def manifest_files_extra_property(env: HEnv) -> Case:
    return _manifest_case(env, lambda m: m["files"]["config.json"].update(url="http://x"), ["config.json", "url"])


# ---------------------------------------------------------------------------------------------
# Cases: adapters (safetensors only)


def adapter_pickle_only_generate(env: HEnv) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickled")
    return Case(_generate(env, None, "--adapter", adapter), ["adapter_model.safetensors", "pickle"])


def adapter_pickle_only_merge(env: HEnv) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickled")
    out = env.tmp / "merged"
    return Case(["merge", env.bundle, "--adapter", adapter, "--out", out], ["pickle"], out)


def adapter_pickle_bytes_named_safetensors(env: HEnv) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    return Case(_eval(env, None, "--adapter", adapter), ["adapter_model.safetensors", "not a valid safetensors"])


def adapter_safetensors_huge_header(env: HEnv) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    return Case(_generate(env, None, "--adapter", adapter), ["adapter_model.safetensors", "safetensors"])


def adapter_not_lora(env: HEnv) -> Case:
    adapter = env.adapter(config=lambda c: c.update(peft_type="PREFIX_TUNING"))
    return Case(_eval(env, None, "--adapter", adapter), ["adapter_config.json", "LORA"])


def adapter_alpha_not_a_number(env: HEnv) -> Case:
    adapter = env.adapter(config=lambda c: c.update(lora_alpha="sixteen"))
    return Case(_generate(env, None, "--adapter", adapter), ["adapter_config.json", "lora_alpha"])


def adapter_config_not_object(env: HEnv) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_config.json").write_text("[1, 2]\n")
    return Case(_eval(env, None, "--adapter", adapter), ["adapter_config.json"])


def adapter_dir_is_file(env: HEnv) -> Case:
    path = env.tmp / "adapter.safetensors"
    path.write_bytes(b"x")
    return Case(_eval(env, None, "--adapter", path), [str(path)])


# ---------------------------------------------------------------------------------------------
# Cases: CLI options


def option_trusted_key_missing(env: HEnv) -> Case:
    key = env.tmp / "nope.pub"
    return Case(_eval(env, env.keys.signed, "--trusted-key", key), [str(key), "trusted key not found"])


def option_trusted_key_is_private(env: HEnv) -> Case:
    return Case(_eval(env, env.keys.signed, "--trusted-key", env.keys.private), [str(env.keys.private), "private key"])


def option_trusted_key_garbage(env: HEnv) -> Case:
    key = env.tmp / "garbage.pub"
    key.write_text("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n")
    return Case(_generate(env, env.keys.signed, "--trusted-key", key), [str(key), "not a PEM public key"])


def option_trusted_key_not_ed25519(env: HEnv) -> Case:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = env.tmp / "ec.pub"
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Case(_eval(env, env.keys.signed, "--trusted-key", key), [str(key), "not an ed25519"])


def option_env_trusted_key_missing(env: HEnv) -> Case:
    key = env.tmp / "env-missing.pub"
    return Case(["plan", env.keys.signed], [str(key), "EDGEFT_TRUSTED_KEY"], env={"EDGEFT_TRUSTED_KEY": str(key)})


def option_sign_key_missing(env: HEnv) -> Case:
    out = env.tmp / "out"
    key = env.tmp / "no.key"
    return Case(["export", env.model, "--out", out, "--sign-key", key], [str(key), "signing key not found"], out)


def option_sign_key_is_public(env: HEnv) -> Case:
    out = env.tmp / "out"
    return Case(["export", env.model, "--out", out, "--sign-key", env.keys.public], ["is a public key"], out)


def option_keygen_exists(env: HEnv) -> Case:
    return Case(["keygen", "--out", env.keys.private], [str(env.keys.private), "already exists"])


def option_keygen_pub_exists(env: HEnv) -> Case:
    out = env.tmp / "new.key"
    (env.tmp / "new.key.pub").write_text("someone's public key\n")
    return Case(["keygen", "--out", out], [str(out) + ".pub", "already exists"], out)


def option_verify_missing_bundle(env: HEnv) -> Case:
    return Case(["verify", env.tmp / "no-bundle"], ["no-bundle", "not found"])


def option_verify_tampered_without_key(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    flip_byte(bundle / "weights.safetensors")
    return Case(["verify", bundle], [str(bundle / "weights.safetensors"), "sha256"])


def option_verify_extra_file(env: HEnv) -> Case:
    bundle = env.copy_bundle()
    (bundle / "notes.txt").write_text("hi\n")
    return Case(["verify", bundle], ["not listed", "notes.txt"])


def option_plan_unsigned_with_key(env: HEnv) -> Case:
    return Case(["plan", env.bundle, *_key(env)], ["unsigned"])


def option_merge_tampered_with_key(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "weights.safetensors")
    out = env.tmp / "merged"
    return Case(
        ["merge", bundle, "--adapter", bundle / "adapter", "--out", out, *_key(env)],
        [str(bundle / "weights.safetensors"), "sha256"],
        out,
    )


def option_serve_tampered_with_key(env: HEnv) -> Case:
    bundle = env.signed()
    flip_byte(bundle / "decoder_lora.onnx", at=100)
    return Case(["serve", bundle, "--port", "0", *_key(env)], [str(bundle / "decoder_lora.onnx"), "sha256"])


# ---------------------------------------------------------------------------------------------
# The CLI table


CASES = [
    # data files
    data_nul_bytes,
    data_number_line,
    data_text_not_string,
    data_text_empty,
    data_messages_not_list,
    data_content_not_string,
    data_symlink_to_missing,
    train_data_utf16,
    # bundles
    bundle_tampered_weights_same_size,
    bundle_tampered_tokenizer_same_size,
    bundle_tampered_init_adapter,
    bundle_tampered_graph,
    bundle_extra_file_signed,
    bundle_manifest_edited_after_signing,
    bundle_resigned_by_attacker,
    bundle_signature_truncated,
    bundle_unsigned_with_key,
    bundle_wrong_key,
    bundle_unsigned_env_key,
    bundle_swapped_graph,
    bundle_swapped_graph_relisted_signed,
    bundle_external_data_dotdot,
    bundle_external_data_absolute,
    bundle_external_data_training_graph,
    bundle_external_data_unlisted_symlink,
    bundle_external_data_listed_symlink,
    bundle_external_data_backslash,
    bundle_graph_truncated_protobuf,
    bundle_symlink_to_outside,
    bundle_symlinked_dir_to_outside,
    bundle_listed_file_is_directory,
    bundle_path_is_a_file,
    # manifests
    manifest_files_dotdot,
    manifest_files_absolute,
    manifest_files_backslash,
    manifest_weights_dotdot,
    manifest_weights_absolute,
    manifest_gradient_map_not_strings,
    manifest_graph_file_dotdot,
    manifest_decoder_file_absolute,
    manifest_init_adapter_dotdot,
    manifest_tokenizer_file_dotdot,
    manifest_sha256_not_hex,
    manifest_files_extra_property,
    # adapters
    adapter_pickle_only_generate,
    adapter_pickle_only_merge,
    adapter_pickle_bytes_named_safetensors,
    adapter_safetensors_huge_header,
    adapter_not_lora,
    adapter_alpha_not_a_number,
    adapter_config_not_object,
    adapter_dir_is_file,
    # CLI options
    option_trusted_key_missing,
    option_trusted_key_is_private,
    option_trusted_key_garbage,
    option_trusted_key_not_ed25519,
    option_env_trusted_key_missing,
    option_sign_key_missing,
    option_sign_key_is_public,
    option_keygen_exists,
    option_keygen_pub_exists,
    option_verify_missing_bundle,
    option_verify_tampered_without_key,
    option_verify_extra_file,
    option_plan_unsigned_with_key,
    option_merge_tampered_with_key,
    option_serve_tampered_with_key,
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory, llama_bundle) -> Keys:
    root = tmp_path_factory.mktemp("keys")
    private, public = keygen(root / "signer.key")
    _, other = keygen(root / "other.key")
    signed = root / "signed-bundle"
    shutil.copytree(llama_bundle, signed)
    sign_bundle(signed, private)
    return Keys(private, public, other, signed)


@pytest.fixture
def henv(tmp_path, factory, llama_bundle, keys, monkeypatch) -> HEnv:
    monkeypatch.delenv("EDGEFT_TRUSTED_KEY", raising=False)
    work = tmp_path / "case"
    work.mkdir()
    return HEnv(work, factory.model("llama"), llama_bundle, keys=keys, outside=tmp_path / "outside")


@pytest.mark.parametrize("build", CASES, ids=[c.__name__.replace("_", "-") for c in CASES])
def test_bad_input(build, henv: HEnv):
    case = build(henv)
    assert case.expect and all(case.expect), "a case must name what its error line says"
    keys = henv.keys
    watched = [henv.tmp, henv.model, henv.bundle, keys.signed, keys.private.parent, *case.watch]
    if henv.outside.exists():
        watched.append(henv.outside)
    before = {str(p): snapshot(p) for p in watched}
    out_existed = case.out is not None and (case.out.exists() or case.out.is_symlink())

    result = CliRunner().invoke(main, [str(a) for a in case.args], env=case.env)
    assert_refused(result, case.expect, case.out, out_existed, watched, before)


def test_the_readme_counts_are_these_tables():
    """README: "50 bad inputs through the real CLI" is test_cli_errors.py's table, and "over 100 bad
    inputs" is that table, this file's CLI table and its HTTP table together, no case counted twice.
    (What each case's error must say is checked where it runs: its needles may not be empty.)"""
    import test_cli_errors

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cli_claim = int(re.search(r"(\d+) bad inputs through the real CLI", readme).group(1))
    total_claim = int(re.search(r"over (\d+) bad inputs across", readme).group(1))
    cli_cases = [param.values[0] for param in test_cli_errors.CASES]
    assert len(cli_cases) == cli_claim
    assert len(cli_cases) + len(CASES) + len(BAD_REQUESTS) > total_claim
    assert len(set(cli_cases)) == len(cli_cases) and len(set(CASES)) == len(CASES)  # no case counted twice


# ---------------------------------------------------------------------------------------------
# HTTP requests


API_KEY = "hardening-key"
TOO_LONG = "the fan is noisy again " * 60  # over the 128-token context
CHAT = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = {
    "malformed JSON": ("completions", '{"model": "base", "prompt": ', {}, 400, "could not parse the JSON body"),
    "body not an object": ("chat/completions", "[1, 2]", {}, 400, "body: Input should be a valid dictionary"),
    "prompt of wrong type": ("completions", {"model": "base", "prompt": 5}, {}, 400, "prompt"),
    "max_tokens of wrong type": ("completions", {"model": "base", "prompt": "hi", "max_tokens": "ten"}, {}, 400, "max_tokens"),
    "messages of wrong type": ("chat/completions", {"model": "base", "messages": "hi"}, {}, 400, "messages"),
    "content of wrong type": ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": 7}]}, {}, 400, "content"),
    "unknown model": ("completions", {"model": "gpt-4", "prompt": "hi"}, {}, 404, "gpt-4"),
    "negative max_tokens": ("completions", {"model": "base", "prompt": "hi", "max_tokens": -5}, {}, 400, "max_tokens"),
    "negative max_completion_tokens": ("chat/completions", {"model": "base", "messages": CHAT, "max_completion_tokens": -1}, {}, 400, "max_completion_tokens"),
    "empty messages": ("chat/completions", {"model": "base", "messages": []}, {}, 400, "messages"),
    "stop of wrong type": ("completions", {"model": "base", "prompt": "hi", "stop": 5}, {}, 400, "stop"),
    "oversized prompt": ("completions", {"model": "base", "prompt": TOO_LONG}, {}, 400, "context"),
    "oversized chat": ("chat/completions", {"model": "base", "messages": [{"role": "user", "content": TOO_LONG}]}, {}, 400, "context"),
    "top_p zero": ("completions", {"model": "base", "prompt": "hi", "top_p": 0}, {}, 400, "top_p"),
    "negative top_k": ("completions", {"model": "base", "prompt": "hi", "top_k": -1}, {}, 400, "top_k"),
    "no API key": ("completions", {"model": "base", "prompt": "hi"}, {"Authorization": ""}, 401, "API key"),
    "wrong API key": ("completions", {"model": "base", "prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, "API key"),
}  # fmt: skip


@pytest.fixture(scope="module")
def http(llama_bundle):
    from fastapi.testclient import TestClient

    from edgeft.device.generate import TextGenerator
    from edgeft.device.server import create_app

    generator = TextGenerator(llama_bundle, provider="cpu")
    with TestClient(create_app(generator, api_key=API_KEY, max_queue=2)) as client:
        yield client


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_http_request(case, http, llama_bundle):
    path, body, headers, status, needle = BAD_REQUESTS[case]
    assert needle, "a case must name what its error message says"
    before = snapshot(llama_bundle)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **headers}
    content = body if isinstance(body, str) else json.dumps(body)
    response = http.post(f"/v1/{path}", content=content, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert needle in error["message"], error
    assert snapshot(llama_bundle) == before
    ok = http.post(
        "/v1/completions",
        json={"model": "base", "prompt": "hi", "max_tokens": 1},
        headers={"Authorization": f"Bearer {API_KEY}"},
    )
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------------
# What onnxruntime does by itself (see the module docstring)


def _probe_ort(root: str) -> dict[str, str]:
    """Load each escaping model with onnxruntime: name -> "loaded [values]" or "refused ..."."""
    import os

    import numpy as np
    import onnxruntime as ort

    found = {}
    for name in ("dotdot", "absolute", "symlink"):
        try:
            path = os.path.join(root, "model", name + ".onnx")
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            found[name] = f"loaded {session.run(None, {'x': np.zeros(1, np.float32)})[0].tolist()}"
        except Exception as e:  # noqa: BLE001 - whatever ORT raises is the answer
            found[name] = "refused " + str(e).replace("\n", " ")[:200]
    return found


def _escaping_models(root: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    (root / "model").mkdir()
    (root / "secret.bin").write_bytes(b"\x00\x00\x80\x3f")  # float32 1.0
    (root / "model" / "link.bin").symlink_to(root / "secret.bin")
    for name, location in (
        ("dotdot", "../secret.bin"),
        ("absolute", str(root / "secret.bin")),
        ("symlink", "link.bin"),
    ):
        w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", "0"), ("length", "4")):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.save(model, str(root / "model" / f"{name}.onnx"))


def test_ort_external_data_behaviour(tmp_path):
    """Pins the facts in the module docstring: ORT 1.19 follows escaping locations, 1.32 refuses."""
    import onnxruntime

    _escaping_models(tmp_path)
    assert onnxruntime.__version__.startswith("1.19")
    found = _probe_ort(str(tmp_path))  # this venv: the training build
    assert all(v == "loaded [1.0]" for v in found.values()), found
    venv = os.environ.get("EDGEFT_DEVICE_VENV")
    if not venv:
        pytest.skip("EDGEFT_DEVICE_VENV not set (make test sets it)")
    script = f"import json, sys\n{inspect.getsource(_probe_ort)}\nprint(json.dumps(_probe_ort(sys.argv[1])))"
    python = str(Path(venv) / "bin" / "python")
    run = subprocess.run([python, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert all(v.startswith("refused") for v in found.values()), found
