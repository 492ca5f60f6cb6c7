"""One benchmark contender in its own process, driven by bench.py over a line protocol.

    python benchmarks/worker.py KIND --seq N [--batch N] [--bundle DIR | --model DIR | --artifacts DIR]
                                [--adapter DIR] [--adapter-b DIR] [--attn IMPL]

KIND: train-edgeft | train-ort119 | train-torch | decode-edgeft | decode-torch. The worker loads
its model, answers ``{"ready": ...}``, then executes one JSON command per stdin line and answers
one JSON line each (on the original stdout; everything else the libraries print goes to stderr).
Its own process gives each contender its own peak RSS (VmHWM) and its own thread pools; the
parent alternates commands between two workers so both see the same machine conditions.

bench.py runs the edgeft workers in the device venv (plain onnxruntime, no torch, so their RSS is
edgeft's alone) and the torch and onnxruntime-training 1.19 workers in the host venv.
``EDGEFT_BENCH_SESSION='{"mem_pattern": true, ...}'`` overrides fields of the training graphs'
SessionConfig (ab.py's A/B rows); ``EDGEFT_BENCH_PROFILE=PREFIX`` turns on ORT's profiler and
``EDGEFT_BENCH_ORT_OPTIONS='{"enable_cpu_mem_arena": false}'`` sets SessionOptions attributes
SessionConfig has no field for (diagnostics only).
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


def batch_arrays(batch: int, seq: int, vocab: int, seed: int = 0):
    """Full rows of random token ids (< vocab), no padding: every position is a loss token."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    return ids, np.ones_like(ids), ids.copy()


def prompt_ids(length: int, vocab: int, seed: int = 1) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed + length)
    return [int(i) for i in rng.integers(3, vocab, size=length)]


def memory() -> dict:
    return {"vm_hwm_mb": common.vm_hwm_mb(), "vm_rss_mb": common.vm_rss_mb()}


def vocab_of(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


# ---------------------------------------------------------------------------------------------
# Training contenders. Each step: one batch, loss + LoRA gradients, clip to 1.0, AdamW.


def session_config(prepack: bool = False):
    """The engine's own graph_session(), with ab.py's overrides (EDGEFT_BENCH_SESSION) applied."""
    from dataclasses import replace

    from edgeft.device.runtime import graph_session

    overrides = json.loads(os.environ.get("EDGEFT_BENCH_SESSION") or "{}")
    return replace(graph_session(None, common.THREADS, prepack), **overrides)


def patch_session_options(attrs: dict) -> None:
    """Set SessionOptions attributes that SessionConfig has no field for (the profiler, the CPU
    arena) on every session this worker opens, by wrapping edgeft.device.session.session_options.
    Diagnostics only (EDGEFT_BENCH_PROFILE, EDGEFT_BENCH_ORT_OPTIONS); the A/B rows use SessionConfig."""
    from edgeft.device import session

    original = session.session_options

    def patched(cfg):
        opts = original(cfg)
        for key, value in attrs.items():
            setattr(opts, key, value)
        return opts

    session.session_options = patched


class EdgeftTrain:
    """The new engine: LoraGraphs.loss_and_grads + numpy AdamW, through train.py's own
    _Run._optimizer_step (the step `edgeft train` runs)."""

    def __init__(self, seq: int, batch: int, bundle: str, adapter: str, **_):
        from types import SimpleNamespace

        import numpy as np

        from edgeft.bundle import Bundle
        from edgeft.device.adapter import load_adapter
        from edgeft.device.data import Batch
        from edgeft.device.optim import AdamW
        from edgeft.device.runtime import LoraGraphs, training_variants
        from edgeft.device.train import _Run, check_prepack

        b = Bundle.open(bundle)
        # an --recompute layers bundle has only the recomputing graph
        recompute = False not in training_variants(b)
        # edgeft train's default (--prepack auto): int4 weights pre-packed when the copy fits this box
        prepack = check_prepack(b, batch, seq, None, recompute, "auto")
        self.graphs = LoraGraphs(b, session_config(prepack), recompute=recompute)
        self.prepack = prepack
        opt = b.manifest["optimizer"]
        ids, mask, labels = batch_arrays(batch, seq, b.manifest["vocab_size"])
        self.batch = Batch(ids, mask, labels, int(batch * (seq - 1)), int(batch * seq))
        lora = load_adapter(Path(adapter), b)
        # The attributes _Run._optimizer_step reads: one micro-batch per step, constant data.
        self.run = SimpleNamespace(
            cfg=SimpleNamespace(grad_accum=1, lr=2e-4, warmup_steps=0),
            lora={n: np.array(lora[n], np.float32) for n in lora},
            step=0,
            total=10**6,
            optim=AdamW(tuple(opt["betas"]), opt["eps"], opt["weight_decay"], opt["max_grad_norm"]),
            _next_batch=lambda: self.batch,
        )
        self.fb_seconds = 0.0
        loss_and_grads = self.graphs.loss_and_grads

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return loss_and_grads(*a, **k)
            finally:
                self.fb_seconds += time.perf_counter() - t0

        self.graphs.loss_and_grads = timed
        self._optimizer_step = _Run._optimizer_step

    def step(self) -> dict:
        self.fb_seconds = 0.0
        t0 = time.perf_counter()
        loss, ntok = self._optimizer_step(self.run, self.graphs)
        dt = time.perf_counter() - t0
        self.run.step += 1
        out = {"seconds": dt, "forward_backward_seconds": self.fb_seconds, "loss": float(loss), "tokens": ntok}
        return {**out, "prepack": self.prepack}

    def end_profiling(self) -> dict:
        return {"path": self.graphs._training.session.end_profiling()}


def training_api():
    """``onnxruntime.training.api`` without running ``onnxruntime/training/__init__`` (which imports
    torch-based modules): an empty package object over the real directory, as the old engine's
    edgeft/device/ort.py did."""
    import importlib
    import importlib.util
    import types

    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime.training")
        if spec is None:
            raise RuntimeError("this onnxruntime has no training API (the host venv's onnxruntime-training 1.19 has)")
        package = types.ModuleType("onnxruntime.training")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["onnxruntime.training"] = package
    return importlib.import_module("onnxruntime.training.api")


class Ort119Train:
    """The old engine (onnxruntime-training 1.19's Module): nominal checkpoint, every parameter copied
    into one contiguous buffer, Module(training, state, eval), memory pattern off, numpy AdamW on
    the LoRA tensors and written back into the Module's state each step."""

    def __init__(self, seq: int, batch: int, artifacts: str, **_):
        import numpy as np
        import onnxruntime as ort
        from safetensors.numpy import load_file

        from edgeft.device.optim import AdamW  # the same optimizer as the new engine

        ort.set_default_logger_severity(3)
        api = training_api()
        root = Path(artifacts)
        meta = json.loads((root / "bench-build.json").read_text())
        self.names = meta["trainable"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = common.THREADS
        opts.inter_op_num_threads = 1
        opts.use_deterministic_compute = True
        opts.enable_mem_pattern = False  # the old engine's setting (-1 GB at seq 512, RESULTS.md then)
        self.state = api.CheckpointState.load_checkpoint(str(root / "nominal_checkpoint"))
        self.module = api.Module(
            str(root / "training_model.onnx"),
            self.state,
            str(root / "eval_model.onnx"),
            device="cpu",
            session_options=opts,
        )
        params = load_file(str(root / "params.safetensors"))
        buffer = np.empty(sum(params[n].size for n in meta["order"]), np.float32)
        offset = 0
        for n in meta["order"]:
            buffer[offset : offset + params[n].size] = params[n].reshape(-1)
            offset += params[n].size
        self.module.copy_buffer_to_parameters(ort.OrtValue.ortvalue_from_numpy(buffer)._ortvalue, False)
        self.lora = {n: np.array(params[n], np.float32) for n in self.names}
        del params, buffer
        self.optim = AdamW((0.9, 0.999), 1e-8, 0.0, 1.0)
        ids, mask, labels = batch_arrays(batch, seq, vocab_of(root.parent / "model"))
        self.inputs = (ids, mask, labels, np.array(float(batch * (seq - 1)), np.float32))
        self.ntok = int(batch * seq)

    def step(self) -> dict:
        t0 = time.perf_counter()
        self.module.lazy_reset_grad()
        self.module.train()
        loss = float(self.module(*self.inputs))
        fb = time.perf_counter() - t0
        params = self.state.parameters
        self.optim.step(self.lora, {n: params[n].grad for n in self.names}, 2e-4)
        for n in self.names:
            params[n] = self.lora[n]
        dt = time.perf_counter() - t0
        return {"seconds": dt, "forward_backward_seconds": fb, "loss": loss, "tokens": self.ntok}


class TorchTrain:
    """torch + PEFT eager fp32: forward with labels, backward, clip to 1.0, torch.optim.AdamW."""

    def __init__(self, seq: int, batch: int, model: str, adapter: str, attn: str = "sdpa", **_):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(common.THREADS)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation=attn)
        self.model = PeftModel.from_pretrained(base, adapter, is_trainable=True)
        self.model.train()
        self.params = [t for t in self.model.parameters() if t.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        ids, mask, labels = batch_arrays(batch, seq, vocab_of(model))
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

    def __init__(self, bundle: str, adapter: str, adapter_b: str, **_):
        from edgeft.device.decoder import Sampling
        from edgeft.device.generate import TextGenerator

        self.Sampling = Sampling
        self.gen = TextGenerator(Path(bundle), threads=common.THREADS)
        self.vocab = self.gen.bundle.manifest["vocab_size"]
        self.gen.decoder.add_adapter("a", Path(adapter))
        self.gen.decoder.add_adapter("b", Path(adapter_b))
        self.gen.stop_ids = set()  # random weights: never stop early, always generate N tokens
        self.stamps: list[float] = []
        generate_ids = self.gen.decoder.generate_ids

        def timed(*a, **k):
            for token in generate_ids(*a, **k):
                self.stamps.append(time.perf_counter())
                yield token

        self.gen.decoder.generate_ids = timed  # the instance attribute Stream calls

    def generate(self, prompt_len: int, new_tokens: int, adapter: str = "a") -> dict:
        prompt = prompt_ids(prompt_len, self.vocab)
        self.stamps = []
        t0 = time.perf_counter()
        stream = self.gen.stream(prompt, adapter, self.Sampling(max_new_tokens=new_tokens))
        for _ in stream:
            pass
        t1 = time.perf_counter()
        return _decode_result(t0, t1, self.stamps, stream.tokens, new_tokens)

    def first_step(self, adapter: str, prompt_len: int) -> dict:
        """One request of one token: its whole time is the first (prefill) step."""
        prompt = prompt_ids(prompt_len, self.vocab, seed=7)
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

    def binding_ab(self, context: int, steps: int) -> dict:
        """Decode steps at a fixed ``context``: the IOBinding path (what non-CPU providers use), forced
        on a second Decoder over the same bundle, against this one's numpy feeds, interleaved."""
        import numpy as np

        decs = {"iobinding": self._binding_decoder(), "numpy_feeds": self.gen.decoder}
        prompt = (np.arange(10, 10 + context, dtype=np.int64) % self.vocab)[None]
        past = {}
        for name, d in decs.items():
            _, past[name] = d.step(
                prompt, np.ones((1, context), np.int64), np.arange(context)[None], d.empty_past(), "a"
            )
        times = {name: [] for name in decs}
        ids, mask, pos = np.array([[5]]), np.ones((1, context + 1), np.int64), np.array([[context]])
        for i in range(steps):
            for name in list(decs) if i % 2 == 0 else list(reversed(decs)):
                t0 = time.perf_counter()
                decs[name].step(ids, mask, pos, past[name], "a")
                times[name].append(time.perf_counter() - t0)
        decs["iobinding"]._release()
        out = {name: {"median_ms": 1e3 * float(np.median(t))} for name, t in times.items()}
        diffs = np.array(times["iobinding"]) - np.array(times["numpy_feeds"])
        out["paired_diff_ms"] = 1e3 * float(np.median(diffs))  # robust to load drift
        return out

    def binding_same_tokens(self) -> dict:
        """Both step paths give the same greedy tokens, switching adapters between requests."""
        prompt = list(range(10, 60))
        runs = [
            [list(d.generate_ids(prompt, a, self.Sampling(max_new_tokens=12), set())) for a in ("a", "b", "base", "a")]
            for d in (self._binding_decoder(), self.gen.decoder)
        ]
        return {"same": runs[0] == runs[1]}

    def _binding_decoder(self):
        if getattr(self, "_binding", None) is None:
            from edgeft.device.decoder import Decoder

            self._binding = Decoder(self.gen.bundle, threads=common.THREADS)
            self._binding._use_binding = True
            for name in ("a", "b"):
                self._binding.adapters[name] = self.gen.decoder.adapters[name]
        return self._binding


class TorchDecode:
    """transformers generate: torch CPU, PEFT adapter (unmerged), use_cache, greedy."""

    def __init__(self, model: str, adapter: str, attn: str = "sdpa", **_):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(common.THREADS)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation=attn)
        base.generation_config.eos_token_id = None  # never stop early, like the edgeft side
        self.model = PeftModel.from_pretrained(base, adapter).eval()
        self.vocab = vocab_of(model)
        self.torch = torch

    def generate(self, prompt_len: int, new_tokens: int, adapter: str = "a") -> dict:
        torch = self.torch
        stamps: list[float] = []

        class Clock:  # a streamer: put() is called with the prompt, then with each new token
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor([prompt_ids(prompt_len, self.vocab)])
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


def sgemm_ort(n: int = 3072, tries: int = 5, model: str | None = None) -> dict:
    """ONNX Runtime's own float32 MatMul peak (MLAS, THREADS intra-op threads), for context. The
    one-MatMul graph comes from the host (``matmul_model``): the device venv has no onnx package."""
    import numpy as np

    from edgeft.device.session import SessionConfig, onnxruntime, session_options

    opts = session_options(SessionConfig(threads=common.THREADS))
    sess = onnxruntime().InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    feeds = {x: np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) for x in ("a", "b")}
    sess.run(None, feeds)
    best = min(_timed(lambda: sess.run(None, feeds)) for _ in range(tries))
    return {"gflops": 2 * n**3 / best / 1e9, "n": n}


def matmul_model(path: Path, n: int = 3072) -> Path:
    """An n x n MatMul graph for sgemm_ort, written by the host side (which has onnx)."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))
    return path


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
    "train-ort119": Ort119Train,
    "train-torch": TorchTrain,
    "decode-edgeft": EdgeftDecode,
    "decode-torch": TorchDecode,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=common.BATCH)
    parser.add_argument("--attn", default="sdpa")
    for name in ("--bundle", "--model", "--artifacts", "--adapter", "--adapter-b"):
        parser.add_argument(name)
    args = parser.parse_args()
    # Protocol on the real stdout; anything a library prints goes to stderr instead.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj) -> None:
        proto.write(json.dumps(obj) + "\n")

    attrs = json.loads(os.environ.get("EDGEFT_BENCH_ORT_OPTIONS") or "{}")
    if os.environ.get("EDGEFT_BENCH_PROFILE"):
        attrs.update(enable_profiling=True, profile_file_prefix=os.environ["EDGEFT_BENCH_PROFILE"])
    if attrs:
        patch_session_options(attrs)
    t0 = time.perf_counter()
    try:
        worker = KINDS[args.kind](**{k: v for k, v in vars(args).items() if k != "kind" and v is not None})
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
