"""Host-side references for the tests: torch + PEFT computations to compare edgeft against."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeft.device.data import Batch


def make_peft_adapter(model_dir: Path, out: Path, r=8, alpha=16, targets=None, seed=1, b_std=0.05, **options) -> Path:
    """A PEFT LoRA adapter made on the host, with non-zero B so it changes the model's output.

    ``options`` go to ``LoraConfig`` (``use_dora``, ``use_rslora``, ``rank_pattern``, ...); a DoRA
    magnitude is scaled by 1 + N(0, 0.1) per row so it differs from PEFT's initial ``||W + s B A||``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM", **options)
    torch.manual_seed(seed)  # LoRA A's init draws from the global generator: not from earlier tests' state
    return _perturbed_and_saved(get_peft_model(base, config), out, seed, b_std)


def _perturbed_and_saved(model, out: Path, seed: int, b_std: float) -> Path:
    """LoRA B ~ N(0, b_std); a DoRA magnitude scaled by 1 + N(0, 0.1); a trained-in-full head
    (modules_to_save) moved by N(0, 0.05); then saved by PEFT to ``out``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * b_std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(out)
    return out


def torch_peft_model(model_dir: Path, adapter_dir: Path, trainable: bool = False, **config_overrides):
    """PEFT model in eager attention; ``config_overrides`` are set on the loaded config."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", **config_overrides
    )
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)


def torch_loss_sum(model, batch: Batch):
    """Summed shifted cross-entropy of ``batch`` under a torch model (2-D mask, HF's own masking)."""
    import torch

    ids = torch.from_numpy(batch.input_ids)
    logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask)).logits
    labels = torch.from_numpy(batch.labels)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def scored_positions(batch: Batch) -> np.ndarray:
    """Where the graph computes logits: position t has a label for token t + 1 (row order)."""
    shifted = np.concatenate([batch.labels[:, 1:], np.full_like(batch.labels[:, :1], -100)], axis=1)
    return shifted != -100


def ort_logits(bundle: Path, lora: dict[str, np.ndarray], batch: Batch) -> np.ndarray:
    """Logits from the bundle's eval graph (lm_head output as an extra graph output): labelled rows only."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(bundle / "eval_model.onnx"))
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    graph = loops[0].attribute[0].g if loops else model.graph  # a chunked loss head runs in a Loop
    head = [n for n in graph.node if n.op_type == "MatMul" and "lm_head" in n.name][-1]
    graph.output.append(onnx.helper.make_tensor_value_info(head.output[0], onnx.TensorProto.FLOAT, None))
    name = head.output[0]
    if loops:  # the chunks' logits as one more scan output: [chunks, rows, vocab]
        name = "chunk_logits"
        loops[0].output.append(name)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: lora[i.name] for i in session.get_inputs() if i.name in lora}
    feeds.update(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        num_loss_tokens=np.array(1.0, np.float32),
    )
    logits = session.run([name], feeds)[0]
    return logits.reshape(-1, logits.shape[-1])[: int(scored_positions(batch).sum())]


def first_batch(bundle: Path, data: Path, batch_size: int = 3, lines: int = 6) -> Batch:
    """A padded batch mixing text, prompt/completion and chat samples from ``data``."""
    from edgeft.device.data import load_examples, make_batches
    from edgeft.device.tokenizer import BundleTokenizer

    tok = BundleTokenizer.from_dir(bundle)
    examples = load_examples(data, tok, 128)[:lines]
    return make_batches(examples, batch_size, tok.pad_token_id, seed=0, epoch=0)[0]


def torch_reference_training(model_dir: Path, bundle: Path, data: Path, steps: int = 3, lr: float = 1e-3) -> dict:
    """The torch + PEFT side of the training-parity tests: the same batches (edgeft's batching,
    batch 2, gradient accumulation 2), warm-up 1 then linear decay, clipping at 1.0,
    torch.optim.AdamW. Returns the PEFT state dict as numpy."""
    import torch
    from peft import get_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    from edgeft.device.data import load_examples, make_batches
    from edgeft.device.tokenizer import BundleTokenizer

    model = torch_peft_model(model_dir, bundle / "adapter", trainable=True)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=steps)
    tok = BundleTokenizer.from_dir(bundle)
    examples = load_examples(data, tok, 128)
    stream = [b for epoch in range(2 * steps) for b in make_batches(examples, 2, tok.pad_token_id, seed=0, epoch=epoch)]
    for step in range(steps):
        micro = stream[2 * step : 2 * step + 2]
        denominator = sum(b.num_loss_tokens for b in micro)
        opt.zero_grad()
        for b in micro:
            (torch_loss_sum(model, b) / denominator).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve an ASGI ``app`` on a free loopback port in a thread; yield its base URL; stop it after."""
    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, httpx)
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def wait_healthy(url: str, httpx, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up")


def assert_openai_error(response, status: int) -> dict:
    """``response`` has ``status`` and OpenAI's JSON error shape; returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def edgeft_training(bundle: Path, data: Path, out: Path) -> dict:
    """edgeft's side of the training-parity tests, with the settings torch_reference_training uses:
    3 steps, lr 1e-3, warm-up 1, batch 2, gradient accumulation 2. Returns the trained adapter."""
    from safetensors.numpy import load_file

    from edgeft.device.train import TrainConfig, train

    cfg = TrainConfig(
        bundle, data, out, max_steps=3, lr=1e-3, warmup_steps=1, batch_size=2, grad_accum=2, progress=False
    )
    train(cfg)
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def torch_model_like_bundle(model_dir: Path, bundle: Path, adapter: Path):
    """torch + PEFT with ``adapter``, trainable, on the bundle's base: for a quantized bundle the
    frozen weights are replaced by their dequantized values, which is what the bundle computes with."""
    import torch
    from safetensors.numpy import load_file

    from edgeft.host.quantize import dequantize

    model = torch_peft_model(model_dir, adapter, trainable=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    quantized = [p for p in manifest["parameters"] if "quantized" in p]
    if quantized:
        stored = load_file(str(bundle / "weights.safetensors"))
        params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        with torch.no_grad():
            for p in quantized:
                w = dequantize(stored[p["key"]], stored[p["quantized"]["scales_key"]], p["shape"][1])
                # the bundle may wrap more modules with LoRA than this adapter does
                name = p["onnx"] if p["onnx"] in params else p["onnx"].replace(".base_layer.", ".")
                params[name].copy_(torch.from_numpy(w))
                if "transposed" in p["quantized"]:  # low-precision int4: the backward reads W^T's own layout
                    data, scales = (stored[k] for k in p["quantized"]["transposed"].values())
                    w_t = dequantize(data, scales.reshape(data.shape[0], -1), p["shape"][0])
                    for linear in modules.values():  # every Linear using it (a tied embedding's is lm_head)
                        if isinstance(linear, torch.nn.Linear) and linear.weight is params[name]:
                            _backward_weight(linear, torch.from_numpy(w_t.T.copy()))
    return model


def _backward_weight(linear, w_backward) -> None:
    """Make ``linear`` compute its input gradient with ``w_backward`` (the forward keeps its weight)."""
    import torch

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            return x @ weight.T

        @staticmethod
        def backward(ctx, grad):
            return grad @ w_backward, None

    def forward(x):
        y = Product.apply(x, linear.weight)
        return y if linear.bias is None else y + linear.bias

    linear.forward = forward


def torch_lora_grads(model, batch: Batch, denominator: float) -> tuple[float, dict[str, np.ndarray]]:
    """Loss (summed cross-entropy / denominator) and ``.grad`` of every trainable tensor, by PEFT name."""
    model.zero_grad()
    loss = torch_loss_sum(model, batch) / denominator
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.item()), grads


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over the tensor, relative to max |want| (the tensor's scale)."""
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


# ---------------------------------------------------------------------------------------------
# Classification bundles (export --task seq-cls / token-cls)


def classifier_class(task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForTokenClassification


def make_classifier_adapter(
    model_dir: Path, out: Path, task: str, labels: list[str], targets=None, seed=1, b_std=0.05
) -> Path:
    """A PEFT adapter made on the host for a classifier: non-zero LoRA B and a head moved away from
    its initial values, saved by PEFT (head under PEFT's modules_to_save keys)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = classifier_class(task).from_pretrained(model_dir, num_labels=len(labels), dtype=torch.float32)
    task_type = "SEQ_CLS" if task == "seq-cls" else "TOKEN_CLS"
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type=task_type))
    return _perturbed_and_saved(model, out, seed, b_std)


def torch_classifier(model_dir: Path, adapter_dir: Path, task: str, labels: list[str], trainable: bool = False):
    """``PeftModel.from_pretrained`` on ``AutoModelFor{Sequence,Token}Classification``, in eval mode
    (the bundle's graphs leave the model's own dropout off)."""
    import torch
    from peft import PeftModel

    base = classifier_class(task).from_pretrained(
        model_dir, num_labels=len(labels), dtype=torch.float32, attn_implementation="eager"
    )
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def torch_classifier_loss(model, batch: Batch):
    """(summed cross-entropy over the labelled items, logits) of a torch classifier on ``batch``."""
    import torch

    ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = torch.from_numpy(batch.labels).reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum")
    return loss, logits
