"""One benchmark contender in its own process, driven by bench.py over a line protocol.

    python benchmarks/worker.py KIND [--seq N] [--batch N] [--attn IMPL]

KIND: train-edgeft | train-torch | decode-edgeft | decode-torch. The worker loads its model,
answers ``{"ready": ...}``, then executes one JSON command per stdin line and answers one JSON
line each (on the original stdout; everything else the libraries print goes to stderr). Its own
process gives each contender its own peak RSS (VmHWM) and its own thread pools; the parent
alternates commands between two workers so both see the same machine conditions.

The edgeft workers never import torch, transformers or peft.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_threads()

VOCAB = common.MODEL["vocab_size"]


def batch_arrays(batch: int, seq: int, seed: int = 0):
    """Full rows of random token ids (< vocab), no padding: every position is a loss token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, seq), dtype=np.int64)
    return ids, np.ones_like(ids), ids.copy()


def prompt_ids(length: int, seed: int = 1) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed + length)
    return [int(i) for i in rng.integers(3, VOCAB, size=length)]


def memory() -> dict:
    return {"vm_hwm_mb": common.vm_hwm_mb(), "vm_rss_mb": common.vm_rss_mb()}


# ---------------------------------------------------------------------------------------------
# Training contenders


class EdgeftTrain:
    """LoraModel.forward_backward + numpy AdamW, through train.py's own _Run._optimizer_step."""

    def __init__(self, seq: int, batch: int, **_):
        from types import SimpleNamespace

        from edgeft.bundle import Bundle
        from edgeft.device.adapter import load_adapter
        from edgeft.device.data import Batch
        from edgeft.device.optim import AdamW
        from edgeft.device.runtime import LoraModel
        from edgeft.device.train import _Run

        p = common.paths()
        bundle = Bundle.open(p["bundle"])
        self.model = LoraModel(bundle, load_adapter(p["adapter_a"], bundle), threads=common.THREADS)
        opt = bundle.manifest["optimizer"]
        ids, mask, labels = batch_arrays(batch, seq)
        self.batch = Batch(ids, mask, labels, int(batch * (seq - 1)), int(batch * seq))
        # The attributes _Run._optimizer_step reads: one micro-batch per step, constant data.
        self.run = SimpleNamespace(
            cfg=SimpleNamespace(grad_accum=1, lr=2e-4, warmup_steps=0),
            step=0,
            total=10**6,
            optim=AdamW(tuple(opt["betas"]), opt["eps"], opt["weight_decay"], opt["max_grad_norm"]),
            _next_batch=lambda: self.batch,
        )
        self._optimizer_step = _Run._optimizer_step
        self.fb_seconds = 0.0
        forward_backward = self.model.forward_backward

        def timed_fb(*a, **k):
            t0 = time.perf_counter()
            try:
                return forward_backward(*a, **k)
            finally:
                self.fb_seconds += time.perf_counter() - t0

        self.model.forward_backward = timed_fb

    def step(self) -> dict:
        self.fb_seconds = 0.0
        t0 = time.perf_counter()
        loss, ntok = self._optimizer_step(self.run, self.model)
        dt = time.perf_counter() - t0
        self.run.step += 1
        return {"seconds": dt, "forward_backward_seconds": self.fb_seconds, "loss": float(loss), "tokens": ntok}


class TorchTrain:
    """torch + PEFT eager: forward with labels, backward, clip to 1.0, torch.optim.AdamW."""

    def __init__(self, seq: int, batch: int, attn: str = "sdpa", **_):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(common.THREADS)
        p = common.paths()
        base = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32, attn_implementation=attn)
        self.model = PeftModel.from_pretrained(base, p["adapter_a"], is_trainable=True)
        self.model.train()
        self.params = [t for t in self.model.parameters() if t.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        ids, mask, labels = batch_arrays(batch, seq)
        self.ids, self.mask, self.labels = (torch.from_numpy(a) for a in (ids, mask, labels))
        self.torch = torch

    def step(self) -> dict:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.labels)
        out.loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        dt = time.perf_counter() - t0
        return {"seconds": dt, "loss": float(out.loss.detach()), "tokens": int(self.ids.numel())}


# ---------------------------------------------------------------------------------------------
# Decode contenders


class EdgeftDecode:
    """TextGenerator.stream (Decoder, KV cache, greedy) with adapter 'a' (and 'b' for switching)."""

    def __init__(self, **_):
        from edgeft.device.decoder import Sampling
        from edgeft.device.generate import TextGenerator

        p = common.paths()
        self.Sampling = Sampling
        self.gen = TextGenerator(p["bundle"], threads=common.THREADS)
        self.gen.decoder.add_adapter("a", p["adapter_a"])
        self.gen.decoder.add_adapter("b", p["adapter_b"])
        self.gen.stop_ids = set()  # random weights: never stop early, always generate N tokens
        self.stamps: list[float] = []
        generate_ids = self.gen.decoder.generate_ids

        def timed(*a, **k):
            for token in generate_ids(*a, **k):
                self.stamps.append(time.perf_counter())
                yield token

        self.gen.decoder.generate_ids = timed  # the instance attribute Stream calls

    def generate(self, prompt_len: int, new_tokens: int, adapter: str = "a") -> dict:
        prompt = prompt_ids(prompt_len)
        self.stamps = []
        t0 = time.perf_counter()
        stream = self.gen.stream(prompt, adapter, self.Sampling(max_new_tokens=new_tokens))
        for _ in stream:
            pass
        t1 = time.perf_counter()
        return _decode_result(t0, t1, self.stamps, stream.tokens, new_tokens)

    def first_step(self, adapter: str, prompt_len: int) -> dict:
        """One request of one token: its whole time is the first (prefill) step."""
        prompt = prompt_ids(prompt_len, seed=7)
        t0 = time.perf_counter()
        tokens = list(self.gen.decoder.generate_ids(prompt, adapter, self.Sampling(max_new_tokens=1), set()))
        return {"seconds": time.perf_counter() - t0, "tokens": tokens}

    def switch_probe(self, prompt_len: int, repeats: int) -> dict:
        """Adapter switch cost: first-step time of a request whose adapter differs from the previous
        request's, against one whose adapter is the same, interleaved so drift hits both alike."""
        switched, same = [], []
        for i in range(repeats):
            pair = ("a", "b") if i % 2 == 0 else ("b", "a")
            self.first_step(pair[0], prompt_len)
            switched.append(self.first_step(pair[1], prompt_len)["seconds"])
            same.append(self.first_step(pair[1], prompt_len)["seconds"])
        return {"switched": switched, "same": same}

    def bind_probe(self, repeats: int = 200) -> dict:
        """The switch itself: rebinding the LoRA OrtValues when the adapter changes (Decoder keeps
        an adapter bound between requests and rebinds only on a change)."""
        d = self.gen.decoder
        if not getattr(d, "_use_binding", False):  # CPU: LoRA arrays are fed with each step
            return {"switch_us": None, "same_us": None}
        switch, same = [], []
        for i in range(repeats):
            name = "a" if i % 2 == 0 else "b"
            t0 = time.perf_counter()
            d._bind_adapter(name)
            switch.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d._bind_adapter(name)
            same.append(time.perf_counter() - t0)
        d._release()
        switch.sort(), same.sort()
        return {
            "switch_us": 1e6 * switch[len(switch) // 2],
            "same_us": 1e6 * same[len(same) // 2],
            "inputs": len(d.lora_inputs),
        }

    def new_session(self, repeats: int) -> dict:
        """What a switch costs without adapters-as-inputs: a fresh session over the same bundle."""
        import gc

        from edgeft.device.decoder import Decoder

        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            d = Decoder(self.gen.bundle, threads=common.THREADS)
            times.append(time.perf_counter() - t0)
            del d
            gc.collect()
        return {"seconds": times}


class TorchDecode:
    """transformers generate: torch CPU, PEFT adapter (unmerged), use_cache, greedy."""

    def __init__(self, attn: str = "sdpa", **_):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(common.THREADS)
        p = common.paths()
        base = AutoModelForCausalLM.from_pretrained(p["model"], dtype=torch.float32, attn_implementation=attn)
        base.generation_config.eos_token_id = None  # never stop early, like the edgeft side
        self.model = PeftModel.from_pretrained(base, p["adapter_a"]).eval()
        self.torch = torch

    def generate(self, prompt_len: int, new_tokens: int, adapter: str = "a") -> dict:
        torch = self.torch
        stamps: list[float] = []

        class Clock:  # a streamer: put() is called with the prompt, then with each new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt_ids(prompt_len)])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
                streamer=Clock(),
            )
        t1 = time.perf_counter()
        tokens = out[0, prompt_len:].tolist()
        return _decode_result(t0, t1, stamps[1:], tokens, new_tokens)


def sgemm_ort(n: int = 3072, tries: int = 5) -> dict:
    """ONNX Runtime's own float32 MatMul peak (MLAS, THREADS intra-op threads), for context."""
    import numpy as np
    from onnx import TensorProto, helper

    from edgeft.device.ort import onnxruntime, session_options

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = onnxruntime().InferenceSession(model.SerializeToString(), session_options(common.THREADS))
    feeds = {x: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for x in ("a", "b")}
    sess.run(None, feeds)
    best = min(_timed(lambda: sess.run(None, feeds)) for _ in range(tries))
    return {"gflops": 2 * n**3 / best / 1e9, "n": n}


def sgemm_torch(n: int = 3072, tries: int = 5) -> dict:
    """torch's own float32 matmul peak (its BLAS), for context."""
    import torch

    torch.set_num_threads(common.THREADS)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(tries))
    return {"gflops": 2 * n**3 / best / 1e9, "n": n}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _decode_result(t0: float, t1: float, stamps: list[float], tokens: list[int], expected: int) -> dict:
    if len(tokens) != expected:
        raise RuntimeError(f"generated {len(tokens)} tokens, expected {expected}")
    first = stamps[0] - t0 if stamps else float("nan")
    steady = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {
        "seconds": t1 - t0,
        "tokens_per_second": len(tokens) / (t1 - t0),
        "first_token_seconds": first,  # prefill + first sample
        "decode_seconds_per_token": steady,  # steady state, KV cache in use
        "tokens": tokens,
    }


KINDS = {
    "train-edgeft": EdgeftTrain,
    "train-torch": TorchTrain,
    "decode-edgeft": EdgeftDecode,
    "decode-torch": TorchDecode,
}


def _apply(opts, overrides: dict):
    """Set SessionOptions attributes; ints for enum attributes (execution_order) become the enum."""
    for key, value in overrides.items():
        current = getattr(opts, key)
        setattr(opts, key, value if isinstance(current, (bool, int, float, str)) else type(current)(value))
    return opts


def _session_option_overrides() -> None:
    """ab.py's hook: EDGEFT_BENCH_ORT_OPTIONS='{"enable_cpu_mem_arena": false}' sets those
    SessionOptions attributes on every session edgeft creates in this worker."""
    overrides = json.loads(os.environ.get("EDGEFT_BENCH_ORT_OPTIONS") or "{}")
    if not overrides:
        return
    import edgeft.device.ort as edgeft_ort
    import edgeft.device.runtime as runtime

    original = edgeft_ort.session_options

    def patched(threads=None, deterministic=True):
        return _apply(original(threads, deterministic), overrides)

    edgeft_ort.session_options = runtime.session_options = patched
    training_options = getattr(runtime, "_training_options", None)
    if training_options is not None:  # the Module's own options, applied after edgeft's choices

        def patched_training(threads=None):
            return _apply(training_options(threads), overrides)

        runtime._training_options = patched_training


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()
    # Protocol on the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")

    _session_option_overrides()
    t0 = time.perf_counter()
    try:
        worker = KINDS[args.kind](seq=args.seq, batch=args.batch, attn=args.attn)
    except Exception as e:  # noqa: BLE001 - report, then exit non-zero
        send({"error": f"{type(e).__name__}: {e}"})
        raise
    send({"ready": True, "load_seconds": time.perf_counter() - t0, "pid": os.getpid(), **memory()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            send(memory())
            break
        try:
            if op == "memory":
                result = memory()
            elif op == "sgemm":  # only asked of decode workers: its buffers must not touch a train peak
                result = (sgemm_torch if args.kind.endswith("torch") else sgemm_ort)(**cmd)
            else:
                result = getattr(worker, op)(**cmd)
        except Exception as e:  # noqa: BLE001
            send({"error": f"{type(e).__name__}: {e}"})
            continue
        send(result)


if __name__ == "__main__":
    main()
