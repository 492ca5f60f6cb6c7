"""onnxruntime-genai loads edgeft's models as they are written: ``edgeft merge`` output (its
``genai_config.json``) and ``edgeft export-genai`` output (base decoder with LoRA tensors as
overridable initializers + one ``.onnx_adapter`` per adapter, switched with genai's ``Adapters``
API). Greedy tokens equal ``edgeft generate`` for the base model and each adapter, on every
supported model type and an int4 bundle.

onnxruntime-genai needs onnxruntime >= 1.31, so it lives in the device venv (the ``genai`` extra);
the genai side runs there, edgeft's reference here.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import MODEL_TYPES
from helpers import make_peft_adapter

from edgeft.device.decoder import BASE, Sampling
from edgeft.device.generate import TextGenerator

VENV = os.environ.get("EDGEFT_DEVICE_VENV")
NEEDS_VENV = pytest.mark.skipif(not VENV, reason="EDGEFT_DEVICE_VENV not set (make test sets it)")
PROMPT = "Station north ridge: pump is worn. What should the crew do?"
NEW_TOKENS = 16
TARGETS = {"phi3": ["qkv_proj", "o_proj"]}

# Runs in the device venv: edgeft's CLI writes the genai directories, onnxruntime-genai generates.
GENAI = """
import json, sys
import onnxruntime_genai as og
from edgeft.cli import main

bundle, adapter, out, prompt_ids, new_tokens, merge = sys.argv[1:7]
ids = json.loads(prompt_ids)

def run(path, adapter_name=None):
    model = og.Model(path)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + int(new_tokens), do_sample=False)
    gen = og.Generator(model, params)
    if adapter_name:
        adapters = og.Adapters(model)
        adapters.load(f"{path}/{adapter_name}.onnx_adapter", adapter_name)
        gen.set_active_adapter(adapters, adapter_name)
    gen.append_tokens(ids)
    tokens = []
    while not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, og.Tokenizer(model)

main(["export-genai", bundle, "--out", f"{out}/genai", "--adapter", f"tuned={adapter}"], standalone_mode=False)
result = {}
result["base"], tok = run(f"{out}/genai")
result["tuned"], _ = run(f"{out}/genai", "tuned")
result["tokenizer"] = [int(t) for t in tok.encode(sys.argv[7])]
if merge == "1":
    main(["merge", bundle, "--adapter", adapter, "--out", f"{out}/merged"], standalone_mode=False)
    result["merged"], _ = run(f"{out}/merged")
print(json.dumps(result))
"""


def _edgeft_tokens(gen: TextGenerator, ids: list[int], adapter: str) -> tuple[list[int], bool]:
    """Greedy tokens, and whether generation stopped at an eos token (which genai returns too)."""
    stream = gen.stream(ids, adapter, Sampling(max_new_tokens=NEW_TOKENS))
    list(stream)
    return stream.tokens, stream.finish_reason == "stop"


def _genai(bundle: Path, adapter: Path, out: Path, ids: list[int], merge: bool) -> dict:
    python = Path(VENV) / "bin" / "python"
    args = [str(bundle), str(adapter), str(out), json.dumps(ids), str(NEW_TOKENS), "1" if merge else "0", PROMPT]
    done = subprocess.run([str(python), "-c", GENAI, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


KINDS = {"llama-int4": {"quantize": "int4"}, "qwen2-dora": {"use_dora": True}}


@NEEDS_VENV
@pytest.mark.parametrize("kind", [*MODEL_TYPES, *KINDS])
def test_genai_greedy_equals_edgeft_generate(factory, tmp_path, kind):
    model_type = kind.split("-")[0]
    options = KINDS.get(kind, {})
    bundle = factory.bundle(model_type, **options)
    targets = TARGETS.get(model_type, ["q_proj", "k_proj", "v_proj", "o_proj"])
    dora = {"use_dora": True} if "use_dora" in options else {}  # merged: the trained magnitudes as defaults
    adapter = make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets, b_std=0.3, **dora)
    gen = TextGenerator(bundle)
    gen.decoder.add_adapter("tuned", adapter)
    ids = gen.encode(PROMPT)
    want = {"base": _edgeft_tokens(gen, ids, BASE), "tuned": _edgeft_tokens(gen, ids, "tuned")}
    assert want["base"] != want["tuned"]  # the adapter changes the answer, so a wrong switch would show

    got = _genai(bundle, adapter, tmp_path, ids, merge="quantize" not in options)
    for name, (tokens, at_eos) in want.items():
        assert got[name][: len(tokens)] == tokens, name
        assert len(got[name]) == len(tokens) + at_eos and (not at_eos or got[name][-1] in gen.stop_ids), name
    if "quantize" not in options:  # merge needs a float32 bundle
        assert got["merged"] == got["tuned"]
        merged_config = json.loads((tmp_path / "merged" / "genai_config.json").read_text())
        # the GroupQueryAttention twin of model.onnx (optimum's, eager): one preallocated cache
        assert merged_config["model"]["decoder"]["filename"] == "model_genai.onnx"
        assert merged_config["search"]["past_present_share_buffer"] is True
    # The GroupQueryAttention decoder: genai preallocates the cache and appends in place.
    assert json.loads((tmp_path / "genai" / "genai_config.json").read_text())["search"]["past_present_share_buffer"]
    # genai's own tokenizer reads the same files and splits the text the same way; it does not run
    # tokenizer.json's post-processor, which is what adds the BOS of the tiny models' tokenizer
    # (a PreTrainedTokenizerFast): an app prepends it, as the prompts above do.
    assert got["tokenizer"] == gen.tokenizer.encode(PROMPT, add_special_tokens=False)


def test_export_genai_errors_are_one_line(factory, tmp_path):
    """No genai package needed: what export-genai refuses, with nothing written."""
    import shutil

    from click.testing import CliRunner

    from edgeft.cli import main
    from edgeft.device.genai import KEEP_ALL, LOGITS_TO_KEEP, keep_all_logits

    bundle = factory.bundle("llama")
    out = tmp_path / "genai"
    cases = {
        "bad adapter name": (["--adapter", "../x=" + str(bundle / "adapter")], "plain file name"),
        "out inside the bundle": (["--out", str(bundle / "genai")], "must not be"),
        "adapter that does not fit": (["--adapter", f"a={tmp_path / 'missing'}"], "missing"),
    }
    for case, (extra, message) in cases.items():
        args = ["export-genai", str(bundle), "--out", str(out), *extra]
        if "--out" in extra:
            args = ["export-genai", str(bundle), *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, (
            case,
            result.output,
        )
        assert not out.exists() and not (bundle / "genai").exists(), case
    # The logits_to_keep default is rewritten in place; a decoder without it (an older bundle) is refused.
    model = (bundle / "decoder_lora.onnx").read_bytes()
    patched = keep_all_logits(model, bundle / "decoder_lora.onnx")
    assert len(patched) == len(model) and patched != model
    import onnx
    from onnx import numpy_helper

    inits = {i.name: i for i in onnx.load_from_string(patched).graph.initializer}
    assert int(numpy_helper.to_array(inits[LOGITS_TO_KEEP])) == KEEP_ALL
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    stripped = onnx.load(str(old / "decoder_lora.onnx"), load_external_data=False)
    kept = [i for i in stripped.graph.initializer if i.name != LOGITS_TO_KEEP]
    del stripped.graph.initializer[:]
    stripped.graph.initializer.extend(kept)
    with pytest.raises(Exception, match="re-export the bundle"):
        keep_all_logits(stripped.SerializeToString(), old / "decoder_lora.onnx")
