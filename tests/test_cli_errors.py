"""The CLI's error contract, table-driven through the real ``edgeft`` command.

Every case feeds one bad input to ``edgeft export|train|eval`` and checks the same three things:

* the exit code is 2;
* stderr is exactly one non-empty line, ``error: ...``, naming what the user must fix
  (a file, a ``path:line:``, a field, an option) - and stdout is empty;
* nothing was half-written: the ``--out`` directory does not exist afterwards, and every
  directory the case touched (its tmp dir, the shared model and bundle fixtures) is byte-for-byte
  what it was before (recursive listing + sha256).

A case is a builder ``(env) -> Case``: it writes whatever bad input it needs under ``env.tmp``
(shared fixtures are always copied first, never edited in place) and returns the argv.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import main

GOOD = ['{"text": "The quick brown fox jumps over the lazy dog."}', '{"text": "Pack my box with five dozen jugs."}']


# ---------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Case:
    args: list
    expect: list[str]  # substrings the error line must contain
    out: Path | None = None  # the command's --out, if it has one
    extra_watch: list[Path] = field(default_factory=list)


@dataclass
class Env:
    tmp: Path
    model: Path  # shared tiny llama model dir (read-only)
    bundle: Path  # shared llama bundle, max_seq_len=128 (read-only)

    def data(self, *lines: str | bytes, name: str = "data.jsonl") -> Path:
        """A JSONL file from ``lines`` (str lines are UTF-8 encoded, bytes written as is)."""
        path = self.tmp / name
        raw = b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
        path.write_bytes(raw)
        return path

    def good_data(self, name: str = "data.jsonl") -> Path:
        return self.data(*GOOD, name=name)

    def copy_bundle(self, name: str = "bundle") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.bundle, dst)
        return dst

    def edit_manifest(self, edit: Callable[[dict], None], name: str = "bundle") -> Path:
        bundle = self.copy_bundle(name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return bundle

    def copy_model(self, name: str = "model") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.model, dst)
        return dst

    def adapter(
        self,
        name: str = "adapter",
        config: Callable[[dict], None] | None = None,
        tensors: Callable[[dict], dict] | None = None,
    ) -> Path:
        """A PEFT adapter dir copied from the bundle's initial one, optionally edited."""
        from safetensors.numpy import load_file, save_file

        dst = self.tmp / name
        shutil.copytree(self.bundle / "adapter", dst)
        if config is not None:
            cfg = json.loads((dst / "adapter_config.json").read_text())
            config(cfg)
            (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        if tensors is not None:
            weights = dst / "adapter_model.safetensors"
            save_file(tensors(load_file(str(weights))), str(weights))
        return dst


def snapshot(root: Path) -> dict[str, str]:
    """Recursive listing of ``root``: relative path -> sha256 for files, a marker for the rest."""
    if not root.exists():
        return {}
    table = {".": "<dir>"}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            table[rel] = f"<link {p.readlink()}>"
        elif p.is_dir():
            table[rel] = "<dir>"
        else:
            table[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return table


# ---------------------------------------------------------------------------------------------
# Cases: export


def export_missing_model_dir(env: Env) -> Case:
    out = env.tmp / "out"
    return Case(["export", env.tmp / "no-such-model", "--out", out], ["config.json"], out)


def export_unsupported_model_type(env: Env) -> Case:
    model = env.copy_model()
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    out = env.tmp / "out"
    return Case(["export", model, "--out", out], ["gpt2", "gemma3_text, llama, mistral, phi3, qwen2, qwen3"], out)


def export_unsupported_model_type_with_targets(env: Env) -> Case:
    """--target-modules does not let an unchecked architecture through (its masks, rope and norms
    could diverge from transformers silently)."""
    model = env.copy_model()
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (model / "config.json").write_text(json.dumps(cfg))
    out = env.tmp / "out"
    return Case(["export", model, "--out", out, "--target-modules", "q_proj"], ["gpt2", "not supported"], out)


def export_dynamic_rope(env: Env) -> Case:
    """NTK "dynamic" rope rescales on the longest sequence seen so far: no graph can reproduce it."""
    model = env.copy_model()
    cfg = json.loads((model / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (model / "config.json").write_text(json.dumps(cfg))
    out = env.tmp / "out"
    return Case(["export", model, "--out", out], ["rope_scaling", "'dynamic'", "llama3", "longrope"], out)


def export_target_modules_match_nothing(env: Env) -> Case:
    out = env.tmp / "out"
    return Case(
        ["export", env.model, "--out", out, "--target-modules", "nonexistent_proj"],
        ["--target-modules", "nonexistent_proj"],
        out,
    )


def export_out_exists(env: Env) -> Case:
    out = env.tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    (out / "sub").mkdir()
    (out / "sub" / "more.bin").write_bytes(bytes(range(256)))
    return Case(["export", env.model, "--out", out], [str(out), "--overwrite"], out)


def export_init_adapter_without_config(env: Env) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_config.json").unlink()
    out = env.tmp / "out"
    return Case(
        ["export", env.model, "--out", out, "--init-adapter", adapter],
        [str(adapter / "adapter_config.json"), "not found"],
        out,
    )


def export_init_adapter_invalid_json(env: Env) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    out = env.tmp / "out"
    return Case(["export", env.model, "--out", out, "--init-adapter", adapter], ["adapter_config.json"], out)


def export_model_config_invalid_json(env: Env) -> Case:
    model = env.copy_model()
    (model / "config.json").write_text('{"model_type": "llama",')
    out = env.tmp / "out"
    return Case(["export", model, "--out", out], ["config.json"], out)


def export_bad_lora_r(env: Env) -> Case:
    out = env.tmp / "out"
    return Case(["export", env.model, "--out", out, "--lora-r", "0"], ["--lora-r"], out)


# ---------------------------------------------------------------------------------------------
# Cases: train


def _train(env: Env, data: Path, *extra, bundle: Path | None = None) -> tuple[list, Path]:
    out = env.tmp / "run"
    return ["train", bundle or env.bundle, "--data", data, "--out", out, "--no-progress", *extra], out


def train_data_missing(env: Env) -> Case:
    args, out = _train(env, env.tmp / "missing.jsonl")
    return Case(args, ["missing.jsonl", "not found"], out)


def train_data_malformed_json_line3(env: Env) -> Case:
    data = env.data(GOOD[0], GOOD[1], '{"text": "unterminated')
    args, out = _train(env, data)
    return Case(args, [f"{data}:3:", "invalid JSON"], out)


def train_data_empty(env: Env) -> Case:
    data = env.data()
    args, out = _train(env, data)
    return Case(args, [str(data), "no examples"], out)


def train_data_blank_lines_only(env: Env) -> Case:
    data = env.data("", "   ", "")
    args, out = _train(env, data)
    return Case(args, [str(data), "no examples"], out)


def train_data_bad_role(env: Env) -> Case:
    msgs = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    data = env.data(GOOD[0], json.dumps({"messages": msgs}))
    args, out = _train(env, data)
    return Case(args, [f"{data}:2:", "'robot'", "messages[1]"], out)


def train_data_too_long(env: Env) -> Case:
    words = " ".join(f"word{i % 50}" for i in range(2000))
    data = env.data('{"text": "hi"}', json.dumps({"text": words}))
    args, out = _train(env, data, "--max-seq-len", "16")
    return Case(args, [f"{data}:2:", "--max-seq-len", "--truncate"], out)


def train_data_array_sample(env: Env) -> Case:
    data = env.data(GOOD[0], '["not", "an", "object"]')
    args, out = _train(env, data)
    return Case(args, [f"{data}:2:", "JSON object", "list"], out)


def train_data_not_utf8(env: Env) -> Case:
    data = env.data(GOOD[0], b'{"text": "caf\xe9 \xff"}')
    args, out = _train(env, data)
    return Case(args, [f"{data}:2:", "UTF-8"], out)


def train_data_prompt_without_completion(env: Env) -> Case:
    data = env.data(GOOD[0], GOOD[1], json.dumps({"prompt": "2+2="}))
    args, out = _train(env, data)
    return Case(args, [f"{data}:3:", "'completion'"], out)


def train_data_no_assistant(env: Env) -> Case:
    data = env.data(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    args, out = _train(env, data)
    return Case(args, [f"{data}:1:", "assistant"], out)


def train_data_lone_surrogate(env: Env) -> Case:
    # Valid JSON and valid UTF-8 bytes, but the decoded string holds an unpaired surrogate.
    data = env.data(GOOD[0], '{"text": "bad \\ud800 char"}')
    args, out = _train(env, data)
    return Case(args, [f"{data}:2:"], out)


def train_data_deeply_nested(env: Env) -> Case:
    data = env.data(GOOD[0], "[" * 100_000 + "]" * 100_000)
    args, out = _train(env, data)
    return Case(args, [f"{data}:2:"], out)


def train_data_is_directory(env: Env) -> Case:
    folder = env.tmp / "data-dir"
    folder.mkdir()
    args, out = _train(env, folder)
    return Case(args, [str(folder)], out)


def train_eval_data_malformed(env: Env) -> Case:
    evals = env.data(GOOD[0], "{oops", name="eval.jsonl")
    args, out = _train(env, env.good_data(), "--eval-data", evals)
    return Case(args, [f"{evals}:2:", "invalid JSON"], out)


def train_out_holds_previous_run(env: Env) -> Case:
    data = env.good_data()
    args, out = _train(env, data)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (out / "summary.json").write_text('{"steps": 3}\n')
    return Case(args, [str(out), "--resume"], out)


def train_out_is_a_file(env: Env) -> Case:
    data = env.good_data()
    args, out = _train(env, data)
    out.write_text("not a directory\n")
    return Case(args, [str(out), "not a directory"], out)


def train_resume_changed_data(env: Env) -> Case:
    data = env.good_data()
    args, out = _train(env, data, "--resume")
    ckpt = out / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    state = {"step": 2, "position": {"epoch": 0, "index": 0}, "losses": [1.0, 0.9], "tokens": 10, "seconds": 0.1}
    # The fingerprint a run with these options would record, except for the data hash.
    fingerprint = {
        "max_steps": None,
        "epochs": None,
        "lr": 2e-4,
        "warmup_steps": 0,
        "batch_size": 4,
        "grad_accum": 1,
        "max_seq_len": None,
        "seed": 0,
        "truncate": False,
        "data_sha256": "0" * 64,
    }
    state["config"] = fingerprint
    (ckpt / "state.json").write_text(json.dumps(state))
    return Case(args, [str(ckpt), "cannot resume", "data_sha256"], out)


def train_resume_corrupt_checkpoint_state(env: Env) -> Case:
    data = env.good_data()
    args, out = _train(env, data, "--resume")
    ckpt = out / "checkpoints" / "step-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 2, ')
    return Case(args, ["state.json"], out)


def train_max_steps_zero(env: Env) -> Case:
    args, out = _train(env, env.good_data(), "--max-steps", "0")
    return Case(args, ["--max-steps"], out)


def train_max_steps_and_epochs(env: Env) -> Case:
    args, out = _train(env, env.good_data(), "--max-steps", "3", "--epochs", "1")
    return Case(args, ["--max-steps", "--epochs", "not both"], out)


def train_batch_size_zero(env: Env) -> Case:
    args, out = _train(env, env.good_data(), "--batch-size", "0")
    return Case(args, ["--batch-size"], out)


def train_max_seq_len_above_bundle(env: Env) -> Case:
    args, out = _train(env, env.good_data(), "--max-seq-len", "256")
    return Case(args, ["--max-seq-len", "128"], out)


def train_bundle_format_newer(env: Env) -> Case:
    bundle = env.edit_manifest(lambda m: m.update(format_version=3))
    args, out = _train(env, env.good_data(), bundle=bundle)
    return Case(args, ["manifest.json", "format_version 3", "newer", "upgrade"], out)


def train_bundle_format_1(env: Env) -> Case:
    bundle = env.edit_manifest(lambda m: m.update(format_version=1))
    args, out = _train(env, env.good_data(), bundle=bundle)
    return Case(args, ["manifest.json", "format_version 1", "re-export"], out)


def train_bundle_missing(env: Env) -> Case:
    args, out = _train(env, env.good_data(), bundle=env.tmp / "no-bundle")
    return Case(args, ["no-bundle", "not found"], out)


# ---------------------------------------------------------------------------------------------
# Cases: eval


def _eval(env: Env, *extra, bundle: Path | None = None, data: Path | None = None) -> list:
    return ["eval", bundle or env.bundle, "--data", data or env.good_data(), *extra]


def eval_max_seq_len_above_bundle(env: Env) -> Case:
    return Case(_eval(env, "--max-seq-len", "256"), ["--max-seq-len", "128"])


def eval_data_missing(env: Env) -> Case:
    return Case(_eval(env, data=env.tmp / "missing.jsonl"), ["missing.jsonl", "not found"])


def eval_adapter_missing(env: Env) -> Case:
    return Case(_eval(env, "--adapter", env.tmp / "no-adapter"), ["no-adapter", "not found"])


def _rank4(tensors: dict) -> dict:
    import numpy as np

    out = {}
    for key, arr in tensors.items():
        shape = (4, arr.shape[1]) if ".lora_A." in key else (arr.shape[0], 4)
        out[key] = np.zeros(shape, np.float32)
    return out


def eval_adapter_wrong_rank(env: Env) -> Case:
    adapter = env.adapter(config=lambda c: c.update(r=4), tensors=_rank4)
    return Case(_eval(env, "--adapter", adapter), ["adapter_model.safetensors", "shape", "r=8", "r=4"])


STRAY = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"


def eval_adapter_stray_module(env: Env) -> Case:
    import numpy as np

    adapter = env.adapter(tensors=lambda t: {**t, STRAY: np.zeros((8, 64), np.float32)})
    return Case(_eval(env, "--adapter", adapter), [STRAY])


def eval_adapter_pickle_only(env: Env) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95pickled-torch-state-dict")
    return Case(_eval(env, "--adapter", adapter), ["adapter_model.safetensors", "pickle", "safetensors"])


def eval_adapter_dora(env: Env) -> Case:
    adapter = env.adapter(config=lambda c: c.update(use_dora=True))
    return Case(_eval(env, "--adapter", adapter), ["adapter_config.json", "use_dora", "not supported"])


def eval_adapter_corrupt_safetensors(env: Env) -> Case:
    adapter = env.adapter()
    (adapter / "adapter_model.safetensors").write_bytes(b"this is not safetensors")
    return Case(_eval(env, "--adapter", adapter), ["adapter_model.safetensors", "safetensors"])


def eval_adapter_rank_zero(env: Env) -> Case:
    adapter = env.adapter(config=lambda c: c.update(r=0))
    return Case(_eval(env, "--adapter", adapter), ["adapter_config.json"])


def eval_bundle_format_newer(env: Env) -> Case:
    bundle = env.edit_manifest(lambda m: m.update(format_version=3))
    return Case(_eval(env, bundle=bundle), ["manifest.json", "format_version 3", "newer", "upgrade"])


def eval_bundle_manifest_deleted(env: Env) -> Case:
    bundle = env.copy_bundle()
    (bundle / "manifest.json").unlink()
    return Case(_eval(env, bundle=bundle), [str(bundle / "manifest.json"), "not found"])


def eval_bundle_file_truncated(env: Env) -> Case:
    bundle = env.copy_bundle()
    weights = bundle / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return Case(_eval(env, bundle=bundle), [str(weights), "size"])


def eval_bundle_file_missing(env: Env) -> Case:
    bundle = env.copy_bundle()
    (bundle / "tokenizer.json").unlink()
    return Case(_eval(env, bundle=bundle), [str(bundle / "tokenizer.json"), "missing"])


def eval_bundle_manifest_missing_field(env: Env) -> Case:
    bundle = env.edit_manifest(lambda m: m.pop("vocab_size"))
    return Case(_eval(env, bundle=bundle), ["manifest.json", "vocab_size"])


def eval_bundle_manifest_bad_nested_field(env: Env) -> Case:
    bundle = env.edit_manifest(lambda m: m["lora"].update(r="eight"))
    return Case(_eval(env, bundle=bundle), ["manifest.json", "lora/r"])


def eval_bundle_manifest_invalid_json(env: Env) -> Case:
    bundle = env.copy_bundle()
    (bundle / "manifest.json").write_text('{"format_version": 2, "files": {')
    return Case(_eval(env, bundle=bundle), [str(bundle / "manifest.json"), "invalid JSON"])


def eval_bundle_manifest_not_object(env: Env) -> Case:
    bundle = env.copy_bundle()
    (bundle / "manifest.json").write_text("[]\n")
    return Case(_eval(env, bundle=bundle), ["manifest.json", "object"])


def eval_batch_size_zero(env: Env) -> Case:
    return Case(_eval(env, "--batch-size", "0"), ["--batch-size"])


# ---------------------------------------------------------------------------------------------
# The table


CASES = [
    # export
    pytest.param(export_missing_model_dir, id="export-model-dir-missing"),
    pytest.param(export_unsupported_model_type, id="export-unsupported-model-type"),
    pytest.param(export_unsupported_model_type_with_targets, id="export-unsupported-model-type-with-targets"),
    pytest.param(export_dynamic_rope, id="export-dynamic-rope"),
    pytest.param(export_target_modules_match_nothing, id="export-target-modules-match-nothing"),
    pytest.param(export_out_exists, id="export-out-exists"),
    pytest.param(export_init_adapter_without_config, id="export-init-adapter-no-config"),
    pytest.param(
        export_init_adapter_invalid_json,
        id="export-init-adapter-invalid-json",
    ),
    pytest.param(
        export_model_config_invalid_json,
        id="export-model-config-invalid-json",
    ),
    pytest.param(export_bad_lora_r, id="export-lora-r-zero"),
    # train
    pytest.param(train_data_missing, id="train-data-missing"),
    pytest.param(train_data_malformed_json_line3, id="train-data-malformed-line3"),
    pytest.param(train_data_empty, id="train-data-empty"),
    pytest.param(train_data_blank_lines_only, id="train-data-blank-lines-only"),
    pytest.param(train_data_bad_role, id="train-data-bad-role"),
    pytest.param(train_data_too_long, id="train-data-too-long"),
    pytest.param(train_data_array_sample, id="train-data-array-sample"),
    pytest.param(train_data_not_utf8, id="train-data-not-utf8"),
    pytest.param(train_data_prompt_without_completion, id="train-data-prompt-no-completion"),
    pytest.param(train_data_no_assistant, id="train-data-no-assistant"),
    pytest.param(
        train_data_lone_surrogate,
        id="train-data-lone-surrogate",
    ),
    pytest.param(
        train_data_deeply_nested,
        id="train-data-deeply-nested",
    ),
    pytest.param(train_data_is_directory, id="train-data-is-directory"),
    pytest.param(train_eval_data_malformed, id="train-eval-data-malformed"),
    pytest.param(train_out_holds_previous_run, id="train-out-holds-previous-run"),
    pytest.param(train_out_is_a_file, id="train-out-is-a-file"),
    pytest.param(train_resume_changed_data, id="train-resume-changed-data"),
    pytest.param(
        train_resume_corrupt_checkpoint_state,
        id="train-resume-corrupt-state",
    ),
    pytest.param(train_max_steps_zero, id="train-max-steps-zero"),
    pytest.param(train_max_steps_and_epochs, id="train-max-steps-and-epochs"),
    pytest.param(train_batch_size_zero, id="train-batch-size-zero"),
    pytest.param(train_max_seq_len_above_bundle, id="train-max-seq-len-above-bundle"),
    pytest.param(train_bundle_format_newer, id="train-bundle-format-newer"),
    pytest.param(train_bundle_format_1, id="train-bundle-format-1"),
    pytest.param(train_bundle_missing, id="train-bundle-missing"),
    # eval
    pytest.param(eval_max_seq_len_above_bundle, id="eval-max-seq-len-above-bundle"),
    pytest.param(eval_data_missing, id="eval-data-missing"),
    pytest.param(eval_adapter_missing, id="eval-adapter-missing"),
    pytest.param(eval_adapter_wrong_rank, id="eval-adapter-wrong-rank"),
    pytest.param(eval_adapter_stray_module, id="eval-adapter-stray-module"),
    pytest.param(eval_adapter_pickle_only, id="eval-adapter-pickle-only"),
    pytest.param(eval_adapter_dora, id="eval-adapter-dora"),
    pytest.param(eval_adapter_corrupt_safetensors, id="eval-adapter-corrupt-safetensors"),
    pytest.param(
        eval_adapter_rank_zero,
        id="eval-adapter-rank-zero",
    ),
    pytest.param(eval_bundle_format_newer, id="eval-bundle-format-newer"),
    pytest.param(eval_bundle_manifest_deleted, id="eval-bundle-manifest-deleted"),
    pytest.param(eval_bundle_file_truncated, id="eval-bundle-file-truncated"),
    pytest.param(eval_bundle_file_missing, id="eval-bundle-file-missing"),
    pytest.param(eval_bundle_manifest_missing_field, id="eval-bundle-manifest-missing-field"),
    pytest.param(eval_bundle_manifest_bad_nested_field, id="eval-bundle-manifest-bad-nested-field"),
    pytest.param(eval_bundle_manifest_invalid_json, id="eval-bundle-manifest-invalid-json"),
    pytest.param(eval_bundle_manifest_not_object, id="eval-bundle-manifest-not-object"),
    pytest.param(eval_batch_size_zero, id="eval-batch-size-zero"),
]


@pytest.fixture
def env(tmp_path, factory, llama_bundle) -> Env:
    work = tmp_path / "case"
    work.mkdir()
    return Env(work, factory.model("llama"), llama_bundle)


@pytest.mark.parametrize("build", CASES)
def test_cli_error(build, env: Env):
    case = build(env)
    watched = [env.tmp, env.model, env.bundle, *case.extra_watch]
    before = {str(p): snapshot(p) for p in watched}
    out_existed = case.out.exists() or case.out.is_symlink() if case.out is not None else False

    result = CliRunner().invoke(main, [str(a) for a in case.args])
    assert_refused(result, case.expect, case.out, out_existed, watched, before)


def assert_refused(result, expect, out, out_existed: bool, watched: list, before: dict) -> None:
    """Exit 2, exactly one 'error: ...' line on stderr holding every ``expect`` substring, nothing
    on stdout, ``out`` not created, and every watched path byte-for-byte as it was."""
    tb = ""
    if result.exc_info is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info))
    assert result.exit_code == 2, f"exit {result.exit_code}\nstderr: {result.stderr!r}\n{tb}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: ") :].strip(), line
    for needle in expect:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert result.stdout == "", result.stdout
    if out is not None and not out_existed:
        assert not out.exists(), f"{out} was created"
    after = {str(p): snapshot(p) for p in watched}
    for p in watched:
        assert after[str(p)] == before[str(p)], f"{p} changed"
