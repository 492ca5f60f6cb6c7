"""Host stage: Hugging Face causal LM + LoRA (peft) -> ONNX Runtime training bundle.

The one public entry is :func:`export_bundle`. Everything runs on the host, which has torch,
transformers, peft and onnx; the bundle it writes is read on the device without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft import __version__
from edgeft.bundle import (
    FORMAT_VERSION,
    GRAPH_INPUTS,
    MANIFEST,
    TOKENIZER_FILES,
    file_table,
    peft_key,
)
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json, staged_directory
from edgeft.host.decoder import export_decoders
from edgeft.models import MODEL_TABLE, default_lora_targets
from edgeft.signing import load_private_key, sign_bundle

log = logging.getLogger(__name__)
OPSET = 17
ADAM = {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}


@dataclass
class ExportConfig:
    model_dir: Path
    out: Path
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    use_rslora: bool = False  # PEFT use_rslora: scaling alpha / sqrt(r)
    use_dora: bool = False  # PEFT use_dora: trainable magnitude vector per LoRA module
    rank_pattern: dict[str, int] | None = None  # PEFT rank_pattern: {module regex: r}
    alpha_pattern: dict[str, float] | None = None  # PEFT alpha_pattern: {module regex: alpha}
    max_seq_len: int = 512
    init_adapter: Path | None = None
    overwrite: bool = False
    sign_key: Path | None = None  # ed25519 private key (edgeft keygen): writes manifest.json.sig
    quantize: str | None = None  # "int8" | "int4": quantized frozen base weights (edgeft/host/quantize.py)
    quant_block_size: int = 32  # int4 block size along K (MatMulNBits layout)


def export_bundle(cfg: ExportConfig) -> Path:
    """Export ``cfg.model_dir`` to a bundle at ``cfg.out``; written in a staging dir, then renamed."""
    from edgeft.device.ort import onnxruntime

    onnxruntime()  # set ORT's log level before anything creates its environment
    t0 = time.time()
    signer = load_private_key(cfg.sign_key) if cfg.sign_key is not None else None  # fail before the work
    hf_config = _check_inputs(cfg)
    model, lora_cfg = _load_peft_model(cfg, hf_config)
    out = Path(cfg.out).resolve()
    with staged_directory(out) as staging:
        _write_bundle(cfg, model, lora_cfg, hf_config, staging)
        if signer is not None:
            sign_bundle(staging, signer)  # over the final manifest.json, before the rename
    log.info("bundle written to %s in %.1fs", out, time.time() - t0)
    return out


def _check_inputs(cfg: ExportConfig) -> dict:
    model_dir = Path(cfg.model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise EdgeftError(f"{config_path}: not found (MODEL_DIR must be a Hugging Face model directory)")
    if not (model_dir / "tokenizer.json").is_file():
        raise EdgeftError(f"{model_dir / 'tokenizer.json'}: not found (a fast tokenizer file is required)")
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{config_path}: invalid JSON ({e})") from None
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("vocab_size"), int):
        raise EdgeftError(f"{config_path}: not a Hugging Face model config (needs model_type and vocab_size)")
    model_type = hf_config.get("model_type")
    if cfg.init_adapter is not None:
        _check_init_adapter(Path(cfg.init_adapter))
    if cfg.target_modules is None and cfg.init_adapter is None:
        default_lora_targets(model_type)  # raises the clear unknown-type error
    if cfg.lora_r < 1 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
        raise EdgeftError("--lora-r must be >= 1, --lora-alpha > 0 and --lora-dropout in [0, 1)")
    _check_method_options(cfg)
    if cfg.max_seq_len < 2:
        raise EdgeftError("--max-seq-len must be at least 2")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise EdgeftError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise EdgeftError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    return hf_config


def _check_method_options(cfg: ExportConfig) -> None:
    from edgeft.device.adapter import check_pattern

    check_pattern(cfg.rank_pattern, "--rank-pattern", integer=True)
    check_pattern(cfg.alpha_pattern, "--alpha-pattern", integer=False)
    if cfg.use_dora and getattr(cfg, "quantize", None):
        raise EdgeftError("--dora cannot be combined with --quantize (DoRA needs the float base weights)")
    if cfg.quantize is not None:
        from edgeft.host.quantize import BLOCK_SIZES, SCHEMES

        if cfg.quantize not in SCHEMES:
            raise EdgeftError(f"--quantize must be one of {', '.join(SCHEMES)}, not {cfg.quantize!r}")
        if cfg.quantize == "int4" and cfg.quant_block_size not in BLOCK_SIZES:
            raise EdgeftError(f"--quant-block-size must be one of {', '.join(map(str, BLOCK_SIZES))}")


def _check_pattern_keys(peft_model, lora_cfg) -> None:
    """Every rank/alpha pattern key must match a LoRA module (PEFT silently ignores the others)."""
    from edgeft.device.adapter import pattern_value

    modules = [m.removeprefix("base_model.model.") for m in lora_scaling(peft_model)]
    targets = lora_cfg.target_modules
    targets = targets if isinstance(targets, str) else ", ".join(sorted(targets))
    for option, pattern in (("--rank-pattern", lora_cfg.rank_pattern), ("--alpha-pattern", lora_cfg.alpha_pattern)):
        for key in pattern or {}:
            if not any(pattern_value({key: 1}, m, None) for m in modules):
                raise EdgeftError(f"{option}: key {key!r} matches no LoRA module (targets: {targets})")


def lora_scaling(peft_model) -> dict[str, float]:
    """Each LoRA module's effective scaling (PEFT's ``module.scaling``), by module name."""
    out = {}
    for name, module in peft_model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling and hasattr(module, "lora_A"):
            out[name] = float(scaling["default"])
    return out


@contextlib.contextmanager
def dora_for_onnx(stop_gradient: bool):
    """Make PEFT's DoRA forward exportable and trainable in ONNX Runtime 1.19, values unchanged.

    - The weight norm ``||W + s * B @ A||`` per output row becomes ``Sqrt(ReduceSum(x * x, axis 1))``
      instead of ``torch.linalg.norm`` (ReduceL2): ORT 1.19's ReduceL2 gradient at opset >= 13 builds
      an invalid Unsqueeze (no axes input) and ``generate_artifacts`` fails.
    - PEFT detaches that norm (DoRA paper, section 4.3: no gradient through it). The ONNX export
      drops ``detach``, and ORT would then differentiate through the norm. With ``stop_gradient``
      the norm goes through a float -> int64 -> float round trip (scaled by 2^40, exact for any
      norm in [2^-17, 2^23)); ORT propagates no gradient through integer tensors, so the gradient is
      PEFT's.
    - ``B @ A`` is a MatMul of the two weights instead of PEFT's ``lora_B(lora_A(eye(in)))``, which
      would bake an in x in identity constant into the graph.
    """
    import torch
    from peft.tuners.lora import dora

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
        if self.fan_in_fan_out:
            weight = weight.T
        weight = weight + scaling * lora_weight
        norm = torch.sqrt((weight * weight).sum(dim=1))
        if stop_gradient:
            norm = (norm * 2.0**40).to(torch.int64).to(norm.dtype) * 2.0**-40
        return norm

    def get_lora_weight(self, lora_A, lora_B, adapter_name=None):
        return lora_B.weight @ lora_A.weight

    saved = dora.DoraLinearLayer.get_weight_norm, dora.DoraLinearLayer.get_lora_weight
    dora.DoraLinearLayer.get_weight_norm, dora.DoraLinearLayer.get_lora_weight = get_weight_norm, get_lora_weight
    try:
        yield
    finally:
        dora.DoraLinearLayer.get_weight_norm, dora.DoraLinearLayer.get_lora_weight = saved


def _load_peft_model(cfg: ExportConfig, hf_config: dict):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32, attn_implementation="eager")
    if cfg.init_adapter is not None:
        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        return model, model.peft_config["default"]
    targets = cfg.target_modules or default_lora_targets(hf_config["model_type"])
    lora_cfg = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        rank_pattern=dict(cfg.rank_pattern or {}),
        alpha_pattern=dict(cfg.alpha_pattern or {}),
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, lora_cfg)
    except ValueError as e:  # peft: target modules not found in the model
        raise EdgeftError(f"--target-modules {','.join(targets)}: {e}") from None
    _check_pattern_keys(peft_model, lora_cfg)
    return peft_model, lora_cfg


def _check_init_adapter(path: Path) -> dict:
    """The same checks a device applies to an adapter, before any model is loaded."""
    from edgeft.device.adapter import WEIGHTS, read_adapter_config

    cfg = read_adapter_config(path)
    if not (path / WEIGHTS).is_file():
        raise EdgeftError(f"{path / WEIGHTS}: not found (only safetensors adapters are loaded)")
    return cfg


def loss_module(peft_model, sliding_window: int | None = None):
    """The torch module whose ONNX export is the training graph: inputs -> causal-LM loss.

    ``loss = sum of token cross-entropies / num_loss_tokens``: the caller passes the token count
    of the whole accumulated batch, so gradient accumulation weighs every token equally.
    """
    import torch

    class LossModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask, labels, num_loss_tokens):
            mask = _additive_mask(attention_mask, sliding_window)
            seq = input_ids.shape[1]
            pos = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(input_ids.shape[0], seq)
            causal_lm = self.peft.base_model.model
            hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=False)
            hidden = hidden.last_hidden_state
            # Position t predicts token t + 1. Only positions with a label reach lm_head, so the
            # full-vocabulary logits (and their gradients) exist for loss tokens only: no logits
            # for prompts, padding or the last position, and no Slice/SliceGrad over vocab-wide tensors.
            targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1).reshape(-1)
            keep = (targets != -100).nonzero().squeeze(1)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
            logits = causal_lm.lm_head(rows).float()
            ce = torch.nn.functional.cross_entropy(logits, targets.index_select(0, keep), reduction="sum")
            return ce / num_loss_tokens

    return LossModel()


def _additive_mask(attention_mask, sliding_window: int | None):
    """4-D causal + padding mask, built here because transformers' vmap mask code does not trace."""
    import torch

    seq = attention_mask.shape[1]
    idx = torch.arange(seq)
    allowed = idx.unsqueeze(1) >= idx.unsqueeze(0)
    if sliding_window:
        allowed = allowed & ((idx.unsqueeze(1) - idx.unsqueeze(0)) < sliding_window)
    allowed = allowed.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)
    zeros = torch.zeros(allowed.shape, dtype=torch.float32)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min)


def _export_onnx(peft_model, hf_config: dict, path: Path):
    import torch

    window = hf_config.get("sliding_window") if hf_config.get("use_sliding_window", True) else None
    wrapper = loss_module(peft_model, window)
    wrapper.train()  # training mode: the exporter then keeps equal-valued weights as separate initializers
    ids = torch.randint(0, hf_config["vocab_size"], (2, 8))
    mask = torch.ones_like(ids)
    count = torch.tensor(14.0)
    dynamic_axes = {n: {0: "batch", 1: "seq"} for n in GRAPH_INPUTS[:3]}
    with torch.no_grad(), warnings.catch_warnings(), dora_for_onnx(stop_gradient=True):
        warnings.simplefilter("ignore")  # tracer notes about constants and Python control flow
        torch.onnx.export(
            wrapper,
            (ids, mask, ids.clone(), count),
            str(path),
            input_names=list(GRAPH_INPUTS),
            output_names=["loss"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamo=False,
        )


def _param_names(peft_model) -> dict[str, str]:
    """ONNX initializer name (exporter prefix stripped) -> Hugging Face / PEFT key."""
    names = {}
    for name, _ in peft_model.named_parameters():
        if "lora_" in name:
            names[name] = peft_key(name)
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            names[name] = key
    return names


def _graph_and_params(peft_model, hf_config: dict, work: Path):
    """Export, strip the wrapper prefix from initializer names, return (model proto, {name: array})."""
    import onnx
    from onnx import numpy_helper

    raw = work / "forward.onnx"
    _export_onnx(peft_model, hf_config, raw)
    proto = onnx.load(str(raw))
    renames = {}
    for init in proto.graph.initializer:
        if init.name.startswith("peft."):
            renames[init.name] = init.name.removeprefix("peft.")
            init.name = renames[init.name]
    for node in proto.graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
    params = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name in _param_names(peft_model)}
    return proto, params


def _write_bundle(cfg: ExportConfig, peft_model, lora_cfg, hf_config: dict, out: Path) -> None:
    from onnxruntime.training import artifacts
    from safetensors.numpy import save_file

    work = Path(tempfile.mkdtemp(prefix="edgeft-export-"))
    try:
        proto, params = _graph_and_params(peft_model, hf_config, work)
        keys = _param_names(peft_model)
        trainable = [n for n in params if "lora_" in n]
        frozen = [n for n in params if n not in trainable]
        if not trainable:
            raise EdgeftError("no LoRA parameters ended up in the graph (check --target-modules)")
        quant = {}
        if cfg.quantize:
            # Quantized weights and scales become user inputs of both graphs (never foldable).
            from edgeft.host.quantize import rewrite_graph, select_and_quantize

            quant = select_and_quantize(proto.graph, params, frozen, keys, cfg.quantize, cfg.quant_block_size)
            rewrite_graph(proto.graph, quant, as_inputs=True)
            frozen = [n for n in frozen if n not in quant]
        # Frozen weights become graph inputs too: no constant folding copies them, and one
        # training session shares them between the training and the eval graph.
        with _native_stderr_to_log():
            artifacts.generate_artifacts(
                proto,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=None,
                optimizer=None,  # AdamW runs on the device over the LoRA tensors (edgeft/device/optim.py)
                artifact_directory=out,
                nominal_checkpoint=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "checkpoint").unlink()  # the complete checkpoint repeats every weight: keep the nominal one
    if quant:  # backward re-dequantizes each weight instead of keeping the forward's float copy alive
        import onnx

        from edgeft.host.quantize import recompute_in_backward

        training = onnx.load(str(out / "training_model.onnx"))
        recompute_in_backward(training.graph, quant)
        onnx.save(training, str(out / "training_model.onnx"))
    tensors = {keys[n]: np.ascontiguousarray(params[n]) for n in frozen}
    if quant:
        from edgeft.host.quantize import tensors_for_file

        tensors.update(tensors_for_file(quant))
    save_file(tensors, str(out / "weights.safetensors"))
    with dora_for_onnx(stop_gradient=False):
        decoders = export_decoders(peft_model, hf_config, keys, out, OPSET, **({"quant": quant} if quant else {}))
    _write_init_adapter(peft_model, lora_cfg, {n: params[n] for n in trainable}, keys, out / "adapter")
    _copy_tokenizer(Path(cfg.model_dir), out)
    order = _parameter_order(out / "training_model.onnx", params)
    manifest = _manifest(cfg, lora_cfg, hf_config, keys, params, order, trainable, out)
    manifest["lora"]["scaling"] = dict(sorted(lora_scaling(peft_model).items()))
    manifest["graphs"].update(decoders)
    if quant:
        _add_quantization(manifest, cfg, quant, out)
    atomic_write_json(out / MANIFEST, manifest)


def _add_quantization(manifest: dict, cfg: ExportConfig, quant: dict, out: Path) -> None:
    """Manifest of a quantized bundle: top-level ``quantization``; each quantized weight is a
    ``parameters[]`` entry with a ``quantized`` object (devices before quantization reject that
    property in their schema check, so they refuse the bundle instead of misreading it); the
    training/eval graph inputs list the quantized data/scales inputs the device feeds."""
    import onnx

    scheme = cfg.quantize
    manifest["quantization"] = {"scheme": scheme, "quantized_tensors": len(quant)}
    if scheme == "int4":
        manifest["quantization"].update(block_size=cfg.quant_block_size, zero_point=8)
    for qt in quant.values():
        manifest["parameters"].append(
            {
                "onnx": qt.name,
                "key": qt.key,
                "shape": list(qt.shape),
                "trainable": False,
                "quantized": {
                    "scheme": scheme,
                    "data_input": qt.data_input,
                    "scales_input": qt.scales_input,
                    "scales_key": qt.scales_key,
                },
            }
        )
    params = {p["onnx"] for p in manifest["parameters"] if "quantized" not in p}
    for graph in ("training", "eval"):
        entry = manifest["graphs"][graph]
        g = onnx.load(str(out / entry["file"]), load_external_data=False).graph
        entry["inputs"] = [
            i.name
            for i in g.input
            if i.name not in params and not i.name.endswith(".buffer") and i.name != "lazy_reset_grad"
        ]


@contextlib.contextmanager
def _native_stderr_to_log():
    """ORT's gradient builder logs every graph pass at INFO from C++, ignoring the Python log
    level; send native stderr to a temp file and replay it only if the build fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _parameter_order(training_model: Path, params: dict) -> list[str]:
    """Parameter names in training-graph input order: the layout of ORT's contiguous buffer."""
    import onnx

    graph = onnx.load(str(training_model), load_external_data=False).graph
    return [i.name for i in graph.input if i.name in params]


def _write_init_adapter(peft_model, lora_cfg, lora: dict, keys: dict, path: Path) -> None:
    from safetensors.numpy import save_file

    path.mkdir()
    save_file({keys[n]: np.ascontiguousarray(a) for n, a in lora.items()}, str(path / "adapter_model.safetensors"))
    config = lora_cfg.to_dict() if hasattr(lora_cfg, "to_dict") else dict(lora_cfg)
    config["base_model_name_or_path"] = peft_model.base_model.model.config.name_or_path or None
    config["inference_mode"] = True
    config = json.loads(json.dumps(config, default=sorted))  # sets (target_modules) -> sorted lists
    atomic_write_json(path / "adapter_config.json", config)


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    for name in TOKENIZER_FILES + (
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)


def _manifest(cfg, lora_cfg, hf_config, keys, params, order, trainable, out: Path) -> dict:
    lora = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tok_cfg = (
        json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() else {}
    )
    return {
        "format_version": FORMAT_VERSION,
        "edgeft_version": __version__,
        "model_type": hf_config["model_type"],
        "base_model": str(hf_config.get("_name_or_path") or Path(cfg.model_dir).name),
        "vocab_size": hf_config["vocab_size"],
        "max_seq_len": cfg.max_seq_len,
        "lora": {
            "r": lora["r"],
            "lora_alpha": lora["lora_alpha"],
            "lora_dropout": lora["lora_dropout"],
            "target_modules": sorted(lora["target_modules"])
            if isinstance(lora["target_modules"], list)
            else lora["target_modules"],
            "trainable_parameters": int(sum(params[n].size for n in trainable)),
            "init_adapter": "adapter",
            "use_rslora": bool(lora.get("use_rslora")),
            "use_dora": bool(lora.get("use_dora")),
            "rank_pattern": lora.get("rank_pattern") or {},
            "alpha_pattern": lora.get("alpha_pattern") or {},
        },
        "optimizer": {"name": "adamw", **ADAM},
        "graphs": {
            "training": {"file": "training_model.onnx", "inputs": list(GRAPH_INPUTS), "outputs": ["loss"]},
            "eval": {"file": "eval_model.onnx", "inputs": list(GRAPH_INPUTS), "outputs": ["loss"]},
        },
        "checkpoint": "nominal_checkpoint",
        "weights": "weights.safetensors",
        "parameters": [
            {"onnx": n, "key": keys[n], "shape": list(params[n].shape), "trainable": n in trainable} for n in order
        ],
        "tokenizer": {
            "files": [f for f in TOKENIZER_FILES if (out / f).is_file()],
            "chat_template": bool(tok_cfg.get("chat_template")),
        },
        "files": file_table(out),
    }


__all__ = ["ExportConfig", "export_bundle", "MODEL_TABLE"]
