"""Serving core: one ONNX Runtime session over the bundle's KV-cache decoder, many adapters.

LoRA A/B are inputs of ``decoder_lora.onnx``; an adapter is a set of small arrays fed with each
request, so switching adapters never creates a session or re-reads base weights. Works with the
plain ``onnxruntime`` package (>= 1.20) as well as the host's training build.

On CPU a step is one ``session.run`` with numpy feeds: ORT reads numpy inputs in place and hands
outputs back as zero-copy numpy views, so the KV cache is never copied on its way between steps.
On any other provider the numpy path would copy the whole cache device -> host -> device every
token, so there a step runs through an IOBinding instead: the present key/values stay device
OrtValues and are bound as the next past, and each adapter's LoRA tensors are uploaded once and
rebound only when the adapter changes. (benchmarks/RESULTS.md has the CPU measurements: the
binding path is no faster there and costs ~100 per-step binding calls.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.errors import EdgeftError

BASE = "base"  # the adapter name that means "no adapter"
LOGITS_TO_KEEP = "logits_to_keep"  # optional decoder_lora.onnx input (SPEC 3b); older bundles lack it


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None


def serving_graph(graphs: dict, ort_version: str) -> dict:
    """``graphs.decoder_lora``, or its eager twin where this onnxruntime is older than the
    GroupQueryAttention decoder needs (its sliding window counts one more key before 1.23)."""
    graph = graphs["decoder_lora"]
    need = graph.get("min_onnxruntime")
    if need is None or _version(ort_version) >= _version(need):
        return graph
    if "decoder_lora_eager" not in graphs:
        raise EdgeftError(f"this bundle's decoder needs onnxruntime >= {need} (installed: {ort_version})")
    return graphs["decoder_lora_eager"]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


class Decoder:
    """The bundle's decoder session plus named adapters (``base`` is always there)."""

    sessions_created = 0  # class-wide count, so tests can prove adapter switches create none

    def __init__(self, bundle: Bundle, provider: str | None = None, threads: int | None = None):
        from edgeft.device.session import SessionConfig, onnxruntime, open_session

        graph = serving_graph(bundle.manifest["graphs"], onnxruntime().__version__)
        self.bundle = bundle
        self.config = json.loads(bundle.path("config.json").read_text())
        config = SessionConfig(provider=provider, threads=threads, deterministic=False)
        self.session = open_session(bundle.path(graph["file"]), config)
        Decoder.sessions_created += 1
        # Off CPU, present key/values stay on the session's device between steps (see the module doc).
        first = self.session.get_providers()[0]
        self._use_binding = first != "CPUExecutionProvider"
        self._kv_device = "cuda" if first == "CUDAExecutionProvider" else "cpu"
        self._binding = self.session.io_binding()
        self._ortvalue_class = onnxruntime().OrtValue
        self._ortvalue_vector = onnxruntime().capi.onnxruntime_pybind11_state.OrtValueVector
        self._bound: tuple[str, dict] | None = None  # (adapter name, its arrays) bound right now
        self._lora_values: dict[str, tuple[dict, dict]] = {}  # name -> (arrays, OrtValues over them)
        self.lora_inputs = graph["lora_inputs"]
        # Longrope (phi3): past this length every position takes the long rope factors (SPEC section 3b).
        self.recompute_beyond = graph.get("recompute_cache_beyond")
        self.past_names = [n for n in graph["inputs"] if n.startswith("past_key_values.")]
        # An input with a default (initializer) is listed with the overridable initializers.
        inputs = [*self.session.get_inputs(), *self.session.get_overridable_initializers()]
        self.can_keep_logits = LOGITS_TO_KEEP in {i.name for i in inputs}
        # A GroupQueryAttention decoder: one preallocated cache per request, bound as past and present
        # (CPU only: other providers keep the device-resident growing cache of the binding path).
        self.shared_kv = graph.get("kv_cache") == "shared" and not self._use_binding
        self.output_names = graph["outputs"]
        self.kv_shape = self._kv_shape()
        self.adapters: dict[str, dict[str, np.ndarray]] = {}
        self.adapters[BASE] = self._base_lora()

    def _kv_shape(self) -> tuple[int, int]:
        cfg = self.config
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        return heads, cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    def _base_lora(self) -> dict[str, np.ndarray]:
        # B = 0 (and, for DoRA, magnitude = ||W|| per row) makes every LoRA branch vanish:
        # the base model, with no second session.
        from edgeft.device.adapter import base_lora

        return base_lora(self.bundle, self.lora_inputs)

    def add_adapter(self, name: str, path: str | Path) -> None:
        from edgeft.device.adapter import load_adapter

        if name == BASE:
            raise EdgeftError(f"adapter name {BASE!r} is reserved for the base model")
        lora = load_adapter(path, self.bundle)
        self.adapters[name] = {n: lora[n] for n in self.lora_inputs}

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: list, adapter: str, keep: int = 1):
        """One forward pass: returns (logits as numpy, present key/values for the next ``past``):
        numpy arrays on CPU, OrtValues on the session's device otherwise; with a
        :class:`SharedCache` as ``past``, that cache (appended in place). ``keep``: how many last
        positions get logits (more than 1 needs a bundle whose decoder has ``logits_to_keep``).
        Every decoder step of a generation goes through here."""
        if isinstance(past, SharedCache):
            return past.run(ids, mask, positions, keep), past
        extra = {}
        if keep != 1:
            if not self.can_keep_logits:
                raise EdgeftError("this bundle's decoder returns the last position's logits only")
            extra[LOGITS_TO_KEEP] = np.array(keep, np.int64)
        if not self._use_binding:
            feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **extra}
            feeds.update(zip(self.past_names, past, strict=True))
            feeds.update(self.adapters[adapter])
            outputs = self.session.run(self.output_names, feeds)
            return outputs[0], outputs[1:]
        binding = self._binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input("position_ids", positions)
        for name, value in extra.items():
            binding.bind_cpu_input(name, value)
        for name, value in zip(self.past_names, past, strict=True):
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        self._bind_adapter(adapter)
        binding.bind_output(self.output_names[0], "cpu")
        for name in self.output_names[1:]:
            binding.bind_output(name, self._kv_device)
        self.session.run_with_iobinding(binding)
        # The binding's output slots are reused (and cleared) by later runs: copy the OrtValues
        # (shared tensors, no data copy) into a vector of our own before handing them out.
        outputs = self._ortvalue_vector()
        for value in binding.get_outputs_as_ortvaluevector():
            outputs.push_back(value)
        ortvalue = self._ortvalue_class
        return outputs[0].numpy(), [ortvalue(outputs[i]) for i in range(1, len(self.output_names))]

    def _bind_adapter(self, adapter: str) -> None:
        """Bind ``adapter``'s LoRA tensors unless they are bound already. Their OrtValues are made
        once per adapter (and remade if ``self.adapters[adapter]`` is replaced)."""
        arrays = self.adapters[adapter]
        if self._bound is not None and self._bound[0] == adapter and self._bound[1] is arrays:
            return
        cached = self._lora_values.get(adapter)
        if cached is None or cached[0] is not arrays:
            from edgeft.device.session import onnxruntime

            ortvalue = onnxruntime().OrtValue.ortvalue_from_numpy
            for gone in set(self._lora_values) - set(self.adapters):
                del self._lora_values[gone]
            values = {
                n: ortvalue(np.ascontiguousarray(arrays[n], dtype=np.float32), self._kv_device, 0)
                for n in self.lora_inputs
            }
            cached = self._lora_values[adapter] = (arrays, values)
        for name, value in cached[1].items():
            self._binding.bind_ortvalue_input(name, value)
        self._bound = (adapter, arrays)

    def _release(self) -> None:
        """Drop the binding's references to the last request's inputs (its KV cache) once it ends."""
        if not self._use_binding:
            return
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._bound = None

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        heads, dim = self.kv_shape
        return [np.zeros((batch, heads, 0, dim), np.float32) for _ in self.past_names]

    def generate_ids(
        self,
        prompt: list[int],
        adapter: str,
        sampling: Sampling,
        stop_ids: set[int],
        observe: Callable[[np.ndarray], None] | None = None,
        score_prompt: bool = False,
    ) -> Iterator[int]:
        """Yield new token ids one by one (prefill once, then one token per step with the cache).

        ``observe`` (if given) receives the logits rows ``[rows, vocab]`` each step produced, before
        the token they choose is yielded: one row per step, or with ``score_prompt`` the prefill's
        rows for every prompt position (row i predicts token i + 1; the last one the first new
        token). With ``score_prompt`` the prefill runs even for ``max_new_tokens`` 0."""
        if adapter not in self.adapters:
            raise EdgeftError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.adapters)})")
        rng = np.random.default_rng(sampling.seed)
        total = len(prompt)
        tokens = list(prompt)
        try:
            if sampling.max_new_tokens <= 0 and not score_prompt:
                return
            capacity = len(prompt) + max(sampling.max_new_tokens, 0)
            run = self._cache(adapter, capacity)
            logits = self._prefill(run, prompt, score_prompt)
            for step in range(sampling.max_new_tokens + 1):
                if observe is not None and (step < sampling.max_new_tokens or score_prompt and step == 0):
                    observe(logits[0] if step == 0 and score_prompt else logits[0, -1:])
                if step == sampling.max_new_tokens:
                    return
                token = sample(logits[0, -1], sampling, rng)
                yield token
                if token in stop_ids or step + 1 == sampling.max_new_tokens:
                    return
                tokens.append(token)
                if self._recompute(total, total + 1):  # a fresh cache over the whole sequence
                    run = self._cache(adapter, capacity)
                    logits = run(np.array([tokens], np.int64), 0)
                else:
                    logits = run(np.array([[token]], np.int64), total)
                total += 1
        finally:
            self._release()

    def _recompute(self, cached: int, total: int) -> bool:
        """Whether this step must run the whole sequence without the cache: a longrope model's
        cached keys were rotated with the short factors, and from here on every position takes the
        long ones. (transformers 4.57's Phi3 generate drops its cache here too, but re-runs the
        sequence without a causal mask, a bug; this equals its forward without a cache.)"""
        limit = self.recompute_beyond
        return limit is not None and 0 < cached <= limit < total

    def _cache(self, adapter: str, capacity: int) -> GrowingCache | SharedCache:
        """The KV cache of one request of at most ``capacity`` tokens."""
        if self.shared_kv:
            return SharedCache(self, adapter, capacity)
        return GrowingCache(self, adapter)

    def _prefill(self, run: GrowingCache | SharedCache, prompt: list[int], all_logits: bool) -> np.ndarray:
        """Logits after the prompt: the last position's, or every position's. A bundle whose decoder
        lacks ``logits_to_keep`` (exported before it) scores token by token instead."""
        n = len(prompt)
        if not all_logits or self.can_keep_logits:
            return run(np.array([prompt], np.int64), 0, n if all_logits else 1)
        rows = [run(np.array([[token]], np.int64), i)[:, -1:] for i, token in enumerate(prompt)]
        return np.concatenate(rows, axis=1)


class GrowingCache:
    """A request's KV cache fed back as the next past: each step's present is one position longer
    (the graph concatenates). Works for every decoder and provider (see :meth:`Decoder.step`)."""

    def __init__(self, decoder: Decoder, adapter: str):
        self.decoder, self.adapter, self.past = decoder, adapter, decoder.empty_past()

    def __call__(self, ids: np.ndarray, start: int, keep: int = 1) -> np.ndarray:
        """Logits of ``ids`` placed at positions ``start``...; the cache grows by them."""
        total = start + ids.shape[1]
        positions = np.arange(start, total, dtype=np.int64)[None]
        mask = np.ones((1, total), np.int64)
        logits, self.past = self.decoder.step(ids, mask, positions, self.past, self.adapter, keep)
        return logits


class SharedCache:
    """A request's KV cache preallocated for all its tokens and bound as both the past and the
    present of every layer: GroupQueryAttention appends each step's keys/values in place, so the
    cache is neither concatenated nor copied per step (``graphs.decoder_lora.kv_cache: shared``,
    CPU). Inputs that do not change (the cache, the adapter's tensors) are bound once."""

    def __init__(self, decoder: Decoder, adapter: str, capacity: int):
        heads, dim = decoder.kv_shape
        self.decoder, self.adapter, self.session = decoder, adapter, decoder.session
        self.binding = binding = decoder.session.io_binding()
        # Only positions below the sequence length are ever read, so the memory needs no zeroing.
        self.buffers = [np.empty((1, heads, capacity, dim), np.float32) for _ in decoder.past_names]
        # A one-row step's logits land in one array bound once: no per-step output binding or
        # OrtValue wrappers for the 2 x layers cache outputs (measured: both cost per token).
        self.logits = np.empty((1, 1, decoder.config["vocab_size"]), np.float32)
        binding.bind_output(
            decoder.output_names[0], "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data
        )
        for past, present, buffer in zip(decoder.past_names, decoder.output_names[1:], self.buffers, strict=True):
            binding.bind_input(past, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        self.lora = decoder.adapters[adapter]  # held: the binding reads these arrays in place
        for name, array in self.lora.items():
            binding.bind_cpu_input(name, array)
        self._fed: list[np.ndarray] = []

    def __call__(self, ids: np.ndarray, start: int, keep: int = 1) -> np.ndarray:
        """Logits of ``ids`` placed at positions ``start``... (through :meth:`Decoder.step`)."""
        total = start + ids.shape[1]
        positions = np.arange(start, total, dtype=np.int64)[None]
        return self.decoder.step(ids, np.ones((1, total), np.int64), positions, self, self.adapter, keep)[0]

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, keep: int = 1) -> np.ndarray:
        if keep != 1:
            return self._run_keeping(ids, int(positions[0, 0]), keep)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        self._fed = list(feeds.values())  # alive until the run is over
        for name, value in feeds.items():
            self.binding.bind_cpu_input(name, value)
        self.session.run_with_iobinding(self.binding)
        return self.logits.copy()

    def _run_keeping(self, ids: np.ndarray, start: int, keep: int) -> np.ndarray:
        """A step that feeds ``logits_to_keep`` (prompt scoring): an IOBinding cannot bind an
        input that has a default (onnxruntime 1.19 refuses it), so this one step runs with plain
        feeds on the cache so far, and its present is copied into the buffers once."""
        past = [b[:, :, :start] for b in self.buffers]
        total = start + ids.shape[1]
        positions = np.arange(start, total, dtype=np.int64)[None]
        logits, present = self.decoder.step(ids, np.ones((1, total), np.int64), positions, past, self.adapter, keep)
        for buffer, value in zip(self.buffers, present, strict=True):
            buffer[:, :, :total] = value[:, :, :total]
        return logits


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, top-k, then top-p (nucleus) sampling."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.size:
        kth = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        cut = order[np.searchsorted(cumulative, sampling.top_p) + 1 :]
        probs[cut] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
