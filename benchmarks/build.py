"""Build what one grid model needs into the cache, once: the Hugging Face model (random weights),
two PEFT adapters per LoRA target set, the edgeft bundles and the onnxruntime-training 1.19
artifacts (the old engine, reproduced here for the side-by-side comparison).

    python benchmarks/build.py JOB_JSON

Run by bench.py in the host venv (torch, PEFT, onnxruntime-training 1.19), in its own process so
the export's memory never inflates the benchmark process. Every item is written in a staging
directory and renamed, so an interrupted build leaves nothing that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_threads()


def main() -> None:
    import torch

    torch.set_num_threads(common.THREADS)
    job = json.loads(sys.argv[1])
    spec = job["spec"]
    built = {}
    ensure_model(spec)
    for targets in job.get("adapters", []):
        ensure_adapters(spec, targets)
    for b in job.get("bundles", []):
        built[bundle_name(b)] = ensure_bundle(spec, **b)
    for targets in job.get("ort119", []):
        built[f"ort119-{targets}"] = ensure_ort119(spec, targets)
    print(json.dumps(built))


def bundle_name(b: dict) -> str:
    return f"bundle-{b['targets']}-{b['precision']}-{b['recompute']}"


def staged(final: Path):
    """A fresh staging dir next to ``final``; ``publish`` renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))


def publish(stage: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)


def reset_peak() -> None:
    """Start VmHWM afresh (Linux clear_refs 5), so each export's peak RSS is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def ensure_model(spec: dict) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer

    from edgeft.host.tiny import train_tokenizer

    final = common.paths(spec, "attn")["model"]
    if (final / "model.safetensors").is_file():
        return
    print(f"building model {spec['name']}", file=sys.stderr)
    stage = staged(final)
    train_tokenizer(stage, vocab_size=512, model_max_length=common.MAX_SEQ_LEN)
    tok = Tokenizer.from_file(str(stage / "tokenizer.json"))
    ids = {n: tok.token_to_id(n) for n in ("<s>", "</s>", "<pad>")}
    config_class = getattr(transformers, common.LAYOUTS[spec["layout"]]["config"])
    config = config_class(
        **spec["config"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(stage, safe_serialization=True)
    publish(stage, final)


def ensure_adapters(spec: dict, targets: str) -> None:
    """Adapters 'a' and 'b': PEFT LoRA with random B (non-zero, so the LoRA path changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    p = common.paths(spec, targets)
    if (p["adapter_a"] / "adapter_model.safetensors").is_file() and (
        p["adapter_b"] / "adapter_model.safetensors"
    ).is_file():
        return
    model = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32)
    for name, seed in (("adapter_a", 1), ("adapter_b", 2)):
        torch.manual_seed(seed)
        lora = LoraConfig(
            r=common.LORA_R,
            lora_alpha=common.LORA_ALPHA,
            target_modules=common.lora_targets(spec["layout"], targets),
            task_type="CAUSAL_LM",
        )
        peft = get_peft_model(model, lora)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, t in peft.named_parameters():
                if "lora_B" in n:
                    t.copy_(torch.randn(t.shape, generator=gen) * 0.05)
        stage = staged(p[name])
        peft.save_pretrained(stage)
        publish(stage, p[name])
        model = peft.unload()


def ensure_bundle(spec: dict, targets: str, precision: str, recompute: str) -> dict:
    """The edgeft bundle, exported from the model with adapter 'a' as its initial adapter."""
    from edgeft.bundle import Bundle
    from edgeft.host.export import ExportConfig, export_bundle

    p = common.paths(spec, targets, precision, recompute)
    meta_path = p["bundle"] / "bench-build.json"
    if meta_path.is_file():
        try:
            graphs = Bundle.open(p["bundle"]).manifest["graphs"]
            # exports before attention recomputation are stale: their training graph keeps seq^2 tensors
            if "decoder_lora" in graphs and "recompute_attention" in graphs["training"]:
                return json.loads(meta_path.read_text())
        except Exception as e:  # noqa: BLE001 - any failure to open means: stale, rebuild
            print(f"{p['bundle']}: stale ({e}); rebuilding", file=sys.stderr)
    print(f"exporting {p['bundle'].name} of {spec['name']}", file=sys.stderr)
    options = {"recompute": recompute} if recompute != "none" else {}  # only asked where it exists
    cfg = ExportConfig(
        p["model"],
        p["bundle"],
        lora_r=common.LORA_R,
        lora_alpha=common.LORA_ALPHA,
        init_adapter=p["adapter_a"],
        max_seq_len=common.MAX_SEQ_LEN,
        quantize=None if precision == "fp32" else precision,
        overwrite=True,
        **options,
    )
    reset_peak()
    t0 = time.perf_counter()
    export_bundle(cfg)
    meta = {"export_seconds": time.perf_counter() - t0, "export_peak_rss_mb": common.vm_hwm_mb()}
    meta["bytes"] = sum(f.stat().st_size for f in p["bundle"].rglob("*") if f.is_file())
    meta_path.write_text(json.dumps(meta) + "\n")
    return meta


def ensure_ort119(spec: dict, targets: str) -> dict:
    """The old engine's artifacts: onnxruntime-training 1.19's generate_artifacts over the forward loss
    graph with the weights as initializers (LoRA trainable, the rest frozen, no loss or optimizer
    blocks), a nominal checkpoint, and every parameter in ``params.safetensors`` by graph name."""
    p = common.paths(spec, targets)
    meta_path = p["ort119"] / "bench-build.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    print(f"building onnxruntime-training 1.19 artifacts ({targets}) of {spec['name']}", file=sys.stderr)
    stage = staged(p["ort119"])
    reset_peak()
    t0 = time.perf_counter()
    proto, params, trainable = trace_with_weights(p)
    from onnxruntime.training import artifacts
    from safetensors.numpy import save_file

    from edgeft.host.training import native_stderr_to_log

    frozen = [n for n in params if n not in trainable]
    with native_stderr_to_log():
        artifacts.generate_artifacts(
            proto,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=None,
            optimizer=None,  # AdamW in numpy over the LoRA tensors, as the old engine did
            artifact_directory=stage,
            nominal_checkpoint=True,
        )
    (stage / "checkpoint").unlink()  # the full checkpoint repeats every weight: the old engine kept the nominal one
    save_file(params, str(stage / "params.safetensors"))
    order = parameter_order(stage / "training_model.onnx", params)
    meta = {
        "export_seconds": time.perf_counter() - t0,
        "export_peak_rss_mb": common.vm_hwm_mb(),
        "order": order,
        "trainable": trainable,
    }
    (stage / "bench-build.json").write_text(json.dumps(meta) + "\n")
    publish(stage, p["ort119"])
    return meta


def trace_with_weights(p: dict):
    """torch.onnx.export of edgeft's loss module with export_params=True (the 1.19 engine's input)."""
    import warnings

    import onnx
    import torch
    from onnx import numpy_helper
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgeft.bundle import GRAPH_INPUTS
    from edgeft.host.export import loss_module
    from edgeft.host.training import OPSET, PREFIX

    base = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32, attn_implementation="eager")
    peft = PeftModel.from_pretrained(base, p["adapter_a"], is_trainable=True)
    wrapper = loss_module(peft)
    wrapper.train()  # training mode: the exporter keeps equal-valued weights as separate initializers
    ids = torch.randint(0, common.VOCAB, (2, 8))
    path = p["ort119"].parent / f".{p['ort119'].name}-forward.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (ids, torch.ones_like(ids), ids.clone(), torch.tensor(14.0)),
            str(path),
            input_names=list(GRAPH_INPUTS),
            output_names=["loss"],
            dynamic_axes={n: {0: "batch", 1: "seq"} for n in GRAPH_INPUTS[:3]},
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    path.unlink()
    renames = {}
    for init in proto.graph.initializer:  # the wrapper's "peft." prefix, as the bundle names them
        if init.name.startswith(PREFIX):
            renames[init.name] = init.name.removeprefix(PREFIX)
            init.name = renames[init.name]
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    names = {n for n, _ in peft.named_parameters()}
    params = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in names}
    trainable = [n for n in params if "lora_" in n]
    return proto, params, trainable


def parameter_order(training_model: Path, params: dict) -> list[str]:
    """Parameter names in training-graph input order: the layout of the Module's contiguous buffer."""
    import onnx

    graph = onnx.load(str(training_model), load_external_data=False).graph
    return [i.name for i in graph.input if i.name in params]


if __name__ == "__main__":
    main()
