"""Host stage: Hugging Face model + LoRA (peft) -> ONNX Runtime training bundle.

A causal LM by default; ``--task seq-cls`` / ``token-cls`` export a classifier whose head is
trained in full (``edgeft.host.tasks``).

The one public entry is :func:`export_bundle`. Everything runs on the host, which has torch,
transformers, peft and onnx; the bundle it writes is read on the device without them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
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
    is_head,
    loss_chunk_rows,
    peft_key,
)
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json, staged_directory
from edgeft.host.graph import WEIGHTS, externalize
from edgeft.models import (
    MODEL_TABLE,
    attention_layout,
    check_rope,
    check_task,
    default_lora_targets,
    model_facts,
    rope_switch,
)
from edgeft.signing import load_private_key, sign_bundle
from edgeft.tasks import CAUSAL_LM, PEFT_TASK_TYPE, Task, check_labels

log = logging.getLogger(__name__)
TRAINING, EVAL = "training_model.onnx", "eval_model.onnx"
TRAINING_RECOMPUTE = "training_recompute.onnx"
RECOMPUTE = ("auto", "none", "layers")
ACCURACY_LEVELS = {"int8": 4, "fp32": 0, "dequant": None}  # --quant-compute -> MatMulNBits accuracy_level
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
    recompute: str = "auto"  # "none" | "layers" | "auto" (both training graphs; the device picks)
    quant_compute: str = "fp32"  # int4 training matmuls: "fp32" | "int8" (MatMulNBits) | "dequant" (float32)
    task: str = CAUSAL_LM  # "causal-lm" | "seq-cls" | "token-cls" (edgeft/tasks.py)
    labels: list[str] | None = None  # the classes of seq-cls / token-cls, in class-id order
    loss_chunk_rows: int | None = None  # causal-lm loss head in chunks of rows (None: 128 MB of logits; 0: off)

    @property
    def task_spec(self) -> Task:
        return Task(self.task, tuple(self.labels or ()))


def export_bundle(cfg: ExportConfig) -> Path:
    """Export ``cfg.model_dir`` to a bundle at ``cfg.out``; written in a staging dir, then renamed."""
    from edgeft.device.session import onnxruntime

    onnxruntime()  # set ORT's log level before anything creates its environment
    t0 = time.time()
    signer = load_private_key(cfg.sign_key) if cfg.sign_key is not None else None  # fail before the work
    hf_config = _check_inputs(cfg)
    with stage("load the model and add LoRA"):
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
    model_facts(model_type)  # the clear unknown-type error, whatever the targets
    check_labels(cfg.task, cfg.labels)
    check_task(model_type, cfg.task)
    if cfg.task != CAUSAL_LM and cfg.quantize:
        raise EdgeftError(f"--quantize is for causal-lm bundles, not --task {cfg.task}")
    _check_architecture(model_dir)
    if cfg.init_adapter is not None:
        _check_adapter_task(_check_init_adapter(Path(cfg.init_adapter)), cfg)
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


def _check_architecture(model_dir: Path) -> None:
    """Refuse, before any weight is loaded, attention windows or rope variants the traced graphs
    would not reproduce (edgeft/models.py). The config is resolved by transformers, which derives
    e.g. layer_types from use_sliding_window and max_window_layers."""
    from transformers import AutoConfig

    resolved = AutoConfig.from_pretrained(model_dir).to_dict()
    attention_layout(resolved)
    check_rope(resolved)


def _check_method_options(cfg: ExportConfig) -> None:
    from edgeft.device.adapter import check_pattern

    check_pattern(cfg.rank_pattern, "--rank-pattern", integer=True)
    check_pattern(cfg.alpha_pattern, "--alpha-pattern", integer=False)
    if cfg.quant_compute not in ACCURACY_LEVELS:
        raise EdgeftError(f"--quant-compute must be one of {', '.join(ACCURACY_LEVELS)}, not {cfg.quant_compute!r}")
    if cfg.recompute not in RECOMPUTE:
        raise EdgeftError(f"--recompute must be one of {', '.join(RECOMPUTE)}, not {cfg.recompute!r}")
    if cfg.loss_chunk_rows is not None and (not isinstance(cfg.loss_chunk_rows, int) or cfg.loss_chunk_rows < 0):
        raise EdgeftError(f"--loss-chunk-rows must be a whole number >= 0, not {cfg.loss_chunk_rows!r}")
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


@contextlib.contextmanager
def longrope_for_onnx(model):
    """Make longrope's short/long choice part of the traced graphs, values unchanged.

    transformers (``dynamic_rope_update``) picks the long factors in Python when
    ``max(position_ids) + 1 > original_max_position_embeddings``, on every call: a trace would
    freeze the choice made for its example inputs. Inside this context each longrope rotary
    module computes ``inv_freq = Where(max(position_ids) + 1 > original, long, short)`` with the
    same two tensors transformers builds, then runs its own forward (unwrapped) on it.
    """
    import inspect

    import torch

    patched = []
    for module in model.modules():
        if getattr(module, "rope_type", None) != "longrope" or not hasattr(module, "original_inv_freq"):
            continue
        config = module.config
        original = getattr(config, "original_max_position_embeddings", None) or config.max_position_embeddings
        short = module.original_inv_freq
        long, _ = module.rope_init_fn(config, short.device, seq_len=original + 1)
        inner = inspect.unwrap(type(module).forward)  # below no_grad and dynamic_rope_update

        def forward(x, position_ids, module=module, inner=inner, short=short, long=long, original=original):
            module.inv_freq = torch.where(position_ids.max() + 1 > original, long, short)
            return inner(module, x, position_ids)

        module.forward = forward
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
            module.inv_freq = module.original_inv_freq


def _load_peft_model(cfg: ExportConfig, hf_config: dict):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from edgeft.device.tokenizer import BundleTokenizer
    from edgeft.host.tasks import load_model

    torch.manual_seed(0)  # PEFT's initial A (and a classification head's initial weights)
    pad = BundleTokenizer.from_dir(cfg.model_dir).pad_token_id if cfg.task != CAUSAL_LM else None
    model = load_model(Path(cfg.model_dir), cfg.task_spec, hf_config, pad)
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
        task_type=PEFT_TASK_TYPE[cfg.task],  # SEQ_CLS / TOKEN_CLS: PEFT trains the head in full
    )
    try:
        peft_model = get_peft_model(model, lora_cfg)
    except ValueError as e:  # peft: target modules not found in the model
        raise EdgeftError(f"--target-modules {','.join(targets)}: {e}") from None
    _check_pattern_keys(peft_model, lora_cfg)
    return peft_model, lora_cfg


def _check_adapter_task(adapter_cfg: dict, cfg: ExportConfig) -> None:
    """A classifier starts from an adapter made for its task (with its head), and a causal LM never
    from a classifier's."""
    got, want = adapter_cfg.get("task_type"), PEFT_TASK_TYPE[cfg.task]
    classifier_types = set(PEFT_TASK_TYPE.values()) - {PEFT_TASK_TYPE[CAUSAL_LM]}
    if got != want and (cfg.task != CAUSAL_LM or got in classifier_types):
        raise EdgeftError(
            f"{Path(cfg.init_adapter) / 'adapter_config.json'}: task_type {got!r} does not fit --task {cfg.task} "
            f"(a {want} adapter is needed)"
        )


def _check_init_adapter(path: Path) -> dict:
    """The same checks a device applies to an adapter, before any model is loaded."""
    from edgeft.device.adapter import WEIGHTS, read_adapter_config

    cfg = read_adapter_config(path)
    if not (path / WEIGHTS).is_file():
        raise EdgeftError(f"{path / WEIGHTS}: not found (only safetensors adapters are loaded)")
    return cfg


def loss_module(peft_model):
    """The torch module whose ONNX export is the training graph: inputs -> causal-LM loss.

    ``loss = sum of token cross-entropies / num_loss_tokens``: the caller passes the token count
    of the whole accumulated batch, so gradient accumulation weighs every token equally.
    """
    import torch

    config = peft_model.base_model.model.config
    layout = attention_layout(config.to_dict())
    softcap = getattr(config, "final_logit_softcapping", None)

    class LossModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.peft = peft_model

        def forward(self, input_ids, attention_mask, labels, num_loss_tokens):
            mask = layout.mask_argument(lambda window: _additive_mask(attention_mask, window))
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
            logits = causal_lm.lm_head(rows)
            if softcap:  # as the CausalLM's forward does after lm_head (Gemma)
                logits = torch.tanh(logits / softcap) * softcap
            logits = logits.float()
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


def _is_trainable(name: str) -> bool:
    """LoRA tensors, DoRA magnitudes and a classification head (PEFT's modules_to_save copy)."""
    return "lora_" in name or is_head(name)


def _param_names(peft_model) -> dict[str, str]:
    """ONNX name (PEFT parameter name) -> Hugging Face / PEFT key in the bundle's files."""
    names = {}
    for name, _ in peft_model.named_parameters():
        if _is_trainable(name):
            names[name] = peft_key(name)
        else:
            names[name] = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return names


def _write_bundle(cfg: ExportConfig, peft_model, lora_cfg, hf_config: dict, out: Path) -> None:
    """The stages: trace -> quantize (optional) -> weights file -> gradients + lowering ->
    external data -> decoders -> adapter, tokenizer -> manifest."""
    import onnx

    from edgeft.host.decoder import export_decoders
    from edgeft.host.losshead import chunk_loss_head
    from edgeft.host.training import differentiate, trace_loss

    task = cfg.task_spec
    params = {n: p.detach().numpy() for n, p in peft_model.named_parameters()}  # views, no copies
    keys = _param_names(peft_model)
    trainable = [n for n in params if _is_trainable(n)]
    if not any("lora_" in n for n in trainable):
        raise EdgeftError("no LoRA parameters ended up in the graph (check --target-modules)")
    if task.is_classification and not any(is_head(n) for n in trainable):
        raise EdgeftError("the classification head is not trainable (PEFT modules_to_save); check --init-adapter")
    work = Path(tempfile.mkdtemp(prefix="edgeft-export-"))
    try:
        with stage("trace the loss"), dora_for_onnx(stop_gradient=True), longrope_for_onnx(peft_model):
            module = _task_loss_module(peft_model, task, hf_config["model_type"])
            forward = trace_loss(module, hf_config["vocab_size"], work, task.type, len(task.labels))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _check_graph_inputs(forward, params, trainable)
    frozen = [i.name for i in forward.graph.input if i.name in params and i.name not in trainable]
    quant = {}
    if cfg.quantize:
        from edgeft.host.quantize import rewrite_graph, select_and_quantize

        low = cfg.quantize == "int4" and cfg.quant_compute != "dequant"
        quant = select_and_quantize(forward.graph, params, frozen, keys, cfg.quantize, cfg.quant_block_size, low)
        rewrite_graph(forward.graph, quant, as_inputs=True)
    file_keys = _file_keys(keys, frozen, quant)
    with stage("write weights.safetensors" + (f" ({cfg.quantize})" if quant else "")):
        ranges = _write_weights(out / WEIGHTS, params, file_keys, quant)
    with stage("build and lower the gradient graph"):
        training, evaluation = differentiate(forward, trainable)
    if quant:
        from edgeft.host.lowprec import low_precision_matmuls
        from edgeft.host.quantize import recompute_in_backward

        level = ACCURACY_LEVELS[cfg.quant_compute]
        for model in (training, evaluation):
            low_precision_matmuls(model.graph, quant, level)  # int4 with --quant-compute int8|fp32
        recompute_in_backward(training.graph, quant)  # what still dequantizes: no float copy kept alive
    graphs = {}
    with stage("recompute, save the training graphs"):
        variants = _training_graphs(cfg.recompute, training, evaluation)
        chunk = cfg.loss_chunk_rows if cfg.loss_chunk_rows is not None else loss_chunk_rows(hf_config["vocab_size"])
        for name, model, _, flags in variants:
            if chunk and not task.is_classification and chunk_loss_head(model.graph, chunk) and name != "eval":
                flags["loss_chunk_rows"] = chunk
    for name, model, file, flags in variants:
        externalize(model.graph, file_keys, ranges, {})
        onnx.save(model, str(out / file))
        graphs[name] = {
            "file": file,
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output],
        }
        if name != "eval":
            graphs[name]["gradients"] = {n: f"{n}_grad" for n in graphs[name]["inputs"] if n in trainable}
            graphs[name].update(flags)
    if not task.is_classification:  # classifiers are served by their eval graph (logits), not a decoder
        with stage("trace the decoders"), dora_for_onnx(stop_gradient=False), longrope_for_onnx(peft_model):
            graphs.update(export_decoders(peft_model, hf_config, file_keys, ranges, out, quant))
        switch = rope_switch(peft_model.base_model.model.config.to_dict())
        if switch is not None:  # the device decoder's part of longrope (SPEC section 3b)
            for key in ("decoder_lora", "decoder_lora_eager"):
                if key in graphs:
                    graphs[key]["recompute_cache_beyond"] = switch
    _write_init_adapter(peft_model, lora_cfg, {n: params[n] for n in trainable}, keys, out / "adapter")
    _copy_tokenizer(Path(cfg.model_dir), out)
    if task.is_classification:  # the labels and pad id go with the model, as transformers saves them
        model = peft_model.base_model.model
        atomic_write_json(out / "config.json", {**hf_config, **_head_fields(model)})
    manifest = _manifest(cfg, lora_cfg, hf_config, keys, params, frozen, trainable, graphs, quant, out)
    manifest["lora"]["scaling"] = dict(sorted(lora_scaling(peft_model).items()))
    atomic_write_json(out / MANIFEST, manifest)


@contextlib.contextmanager
def stage(what: str):
    """Log how long an export stage took (INFO: `make bench-large` reads where the time goes)."""
    t0 = time.perf_counter()
    yield
    log.info("export stage: %s: %.1f s", what, time.perf_counter() - t0)


def _training_graphs(recompute: str, training, evaluation) -> list[tuple]:
    """(manifest name, model, file, manifest flags) of the graphs to write: ``graphs.training`` is the device's
    default; with ``auto`` the layer-recomputing variant is ``graphs.training_recompute`` beside it.
    The plain graph recomputes each layer's attention probabilities (no seq^2 tensor kept)."""
    from edgeft.host.recompute import recompute_attention, recompute_layers

    graphs = [("eval", evaluation, EVAL, {})]
    variant = None
    if recompute != "none":
        variant = type(training)()
        variant.CopyFrom(training)
    if recompute != "layers":
        flags = {"recompute": False, "recompute_attention": recompute_attention(training.graph) > 0}
        graphs.append(("training", training, TRAINING, flags))
    if variant is not None:
        if not recompute_layers(variant.graph):
            if recompute == "auto":  # nothing to recompute in this architecture: the plain graph alone
                return graphs
            raise EdgeftError("--recompute layers: found no layers to recompute in this model's training graph")
        name = "training" if recompute == "layers" else "training_recompute"
        flags = {"recompute": True, "recompute_attention": True}  # each layer's attention with the layer
        graphs.append((name, variant, TRAINING if recompute == "layers" else TRAINING_RECOMPUTE, flags))
    return graphs


def _task_loss_module(peft_model, task: Task, model_type: str):
    if not task.is_classification:
        return loss_module(peft_model)
    from edgeft.host.tasks import classification_loss_module

    return classification_loss_module(peft_model, task, model_type)


def _head_fields(model) -> dict:
    config = model.config
    fields = {
        "architectures": [type(model).__name__],  # e.g. BertForSequenceClassification
        "id2label": {str(k): v for k, v in config.id2label.items()},
        "label2id": dict(config.label2id),
    }
    if config.pad_token_id is not None:
        fields["pad_token_id"] = config.pad_token_id
    return fields


def _check_graph_inputs(forward, params: dict, trainable: list[str]) -> None:
    """Every graph input is a data input or a parameter (a buffer traced as an input would have no
    value), and every LoRA tensor is an input (an exporter that merged equal tensors would fail here)."""
    names = [i.name for i in forward.graph.input]
    unknown = [n for n in names if n not in params and n not in GRAPH_INPUTS]
    if unknown:
        raise EdgeftError(f"the traced model has inputs that are neither data nor parameters: {', '.join(unknown[:5])}")
    missing = sorted(set(trainable) - set(names))
    if missing:
        raise EdgeftError(f"LoRA tensors missing from the traced training graph: {', '.join(missing[:5])}")


def _file_keys(keys: dict[str, str], frozen: list[str], quant: dict) -> dict[str, str]:
    """Graph tensor name -> weights.safetensors key, for every tensor stored in the file."""
    out = {n: keys[n] for n in frozen if n not in quant}
    for qt in quant.values():
        out[qt.data_input] = qt.key
        out[qt.scales_input] = qt.scales_key
        out.update(qt.transposed)
    return out


def _write_weights(path: Path, params: dict, file_keys: dict[str, str], quant: dict) -> dict[str, tuple[int, int]]:
    """weights.safetensors: frozen float32 weights and quantized data + scales, each once; the
    quantized codes are computed tensor by tensor as the file is written."""
    from edgeft.host.weights import write_safetensors

    specs, produce = [], {}
    for qt in quant.values():
        for key, shape, dtype, fn in qt.file_tensors():
            specs.append((key, shape, dtype))
            produce[key] = fn
    quantized_keys = set(produce)
    for name, key in file_keys.items():
        if key not in quantized_keys and key not in produce:
            specs.append((key, params[name].shape, params[name].dtype))
            produce[key] = lambda name=name: params[name]
    return write_safetensors(path, specs, lambda key: produce[key]())


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


def _manifest(cfg, lora_cfg, hf_config, keys, params, frozen, trainable, graphs, quant, out: Path) -> dict:
    lora = json.loads((out / "adapter" / "adapter_config.json").read_text())
    tok_cfg = (
        json.loads((out / "tokenizer_config.json").read_text()) if (out / "tokenizer_config.json").is_file() else {}
    )
    parameters = [
        {"onnx": n, "key": keys[n], "shape": list(params[n].shape), "trainable": True, **_head_flag(n)}
        for n in trainable
    ] + [
        {"onnx": n, "key": keys[n], "shape": list(params[n].shape), "trainable": False}
        for n in frozen
        if n not in quant
    ]
    manifest = {
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
        "graphs": graphs,
        "weights": WEIGHTS,
        "parameters": parameters,
        "tokenizer": {
            "files": [f for f in TOKENIZER_FILES if (out / f).is_file()],
            "chat_template": bool(tok_cfg.get("chat_template")),
        },
    }
    if cfg.task != CAUSAL_LM:
        manifest["task"] = {"type": cfg.task, "labels": list(cfg.labels)}
    if quant:
        _add_quantization(manifest, cfg, quant)
    manifest["files"] = file_table(out)
    return manifest


def _head_flag(name: str) -> dict:
    # A property devices from before classification do not know: their schema check refuses the
    # bundle (parameters[] items allow no extra properties) instead of misreading it.
    return {"head": True} if is_head(name) else {}


def _add_quantization(manifest: dict, cfg: ExportConfig, quant: dict) -> None:
    """Top-level ``quantization``; each quantized weight is a ``parameters[]`` entry with a
    ``quantized`` object naming its data and scales tensors (graph names and file keys)."""
    scheme = cfg.quantize
    manifest["quantization"] = {"scheme": scheme, "quantized_tensors": len(quant)}
    if scheme == "int4":
        manifest["quantization"].update(block_size=cfg.quant_block_size, zero_point=8, compute=cfg.quant_compute)
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
                    **({"transposed": qt.transposed} if qt.has_transposed else {}),
                },
            }
        )


__all__ = ["ExportConfig", "export_bundle", "MODEL_TABLE"]
