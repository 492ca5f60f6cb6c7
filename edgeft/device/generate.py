"""Device stage: text generation with the KV-cache decoder. Entry for the CLI: :func:`generate`.

:class:`TextGenerator` is shared with ``edgeft serve``: prompt tokenization (as the Hugging Face
tokenizer does by default, or through the chat template), streaming detokenization, stop strings.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.bundle import Bundle
from edgeft.device.decoder import BASE, Decoder, Sampling
from edgeft.device.logprobs import Scorer, TokenScore
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.errors import EdgeftError
from edgeft.tasks import CAUSAL_LM, Task, require


@dataclass
class GenerateConfig:
    bundle: Path
    prompt: str
    adapter: Path | None = None
    chat: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    provider: str | None = None
    threads: int | None = None
    profile: str | None = None
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)


def generate(cfg: GenerateConfig, out=None) -> str:
    """Stream the completion of ``cfg.prompt`` to ``out`` (stdout); return the whole text."""
    from edgeft.profiles import runtime_settings

    out = out or sys.stdout
    settings = runtime_settings(cfg.profile, "serve", cfg.threads, cfg.provider)
    gen = TextGenerator(Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key), settings.provider, settings.threads)
    adapter = BASE
    if cfg.adapter is not None:
        gen.decoder.add_adapter("adapter", cfg.adapter)
        adapter = "adapter"
    messages = [{"role": "user", "content": cfg.prompt}] if cfg.chat else None
    prompt = gen.encode(None if cfg.chat else cfg.prompt, messages)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
    stream = gen.stream(prompt, adapter, sampling, cfg.stop)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.text


class TextGenerator:
    """A bundle's tokenizer and decoder session, ready to stream completions for any adapter."""

    def __init__(self, bundle: str | Path | Bundle, provider: str | None = None, threads: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        require(Task.of(self.bundle.manifest), (CAUSAL_LM,), "text generation")
        self.tokenizer = BundleTokenizer.from_dir(self.bundle.root)
        self.decoder = Decoder(self.bundle, provider, threads)
        self.stop_ids = self._stop_ids()
        self._token_texts: dict[int, str] = {}

    def _stop_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id} - {None}
        gen_cfg = self.bundle.path("generation_config.json")
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def encode(self, prompt: str | None, messages: list[dict] | None = None) -> list[int]:
        """Token ids as transformers makes them: the tokenizer's default special tokens for text,
        the chat template with a generation prompt (and no extra specials) for messages."""
        if messages is not None:
            ids = self.tokenizer.encode(
                self.tokenizer.render_chat(messages, add_generation_prompt=True), add_special_tokens=False
            )
        else:
            ids = self.tokenizer.encode(prompt)
        return self.check_ids(ids)

    def token_text(self, token: int) -> str:
        """One token as text (special tokens included), as log-probability replies name it."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def prefix_offsets(self, ids: list[int], limit: int) -> list[int]:
        """Where each of ``ids`` starts in their decoded text (at most ``limit``)."""
        return [min(len(self.tokenizer.decode(ids[:i])), limit) for i in range(len(ids))]

    def check_ids(self, ids: list[int]) -> list[int]:
        """``ids`` if they make a prompt this bundle can take: not empty, shorter than its context,
        each a token of the model's vocabulary."""
        if not ids:
            raise EdgeftError("the prompt is empty")
        if len(ids) >= self.bundle.max_seq_len:
            raise EdgeftError(f"the prompt has {len(ids)} tokens; this bundle's context is {self.bundle.max_seq_len}")
        vocab = self.decoder.config["vocab_size"]
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EdgeftError(f"token id {bad} is not in the model's vocabulary (0..{vocab - 1})")
        return ids

    def stream(
        self,
        prompt: list[int],
        adapter: str,
        sampling: Sampling,
        stop: list[str] | None = None,
        logprobs: int | None = None,
        score_prompt: bool = False,
    ) -> Stream:
        """A generation to iterate. ``logprobs``: score each generated token (its log-probability and
        the ``logprobs`` most likely alternatives); ``score_prompt``: score the prompt's tokens too
        (``Stream.prompt_scores``), which also works with ``max_new_tokens`` 0."""
        if adapter not in self.decoder.adapters:
            raise EdgeftError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.decoder.adapters)})")
        room = self.bundle.max_seq_len - len(prompt)
        capped = Sampling(
            min(sampling.max_new_tokens, room), sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed
        )
        scorer = None
        if logprobs is not None or score_prompt:
            scorer = Scorer(logprobs or 0, prompt if score_prompt else None)
        return Stream(self, prompt, adapter, capped, [s for s in (stop or []) if s], scorer)


class Stream:
    """Iterates text pieces; afterwards ``text``, ``finish_reason`` and token counts are set (and,
    with a scorer, ``prompt_scores`` and :meth:`scored`)."""

    def __init__(
        self,
        gen: TextGenerator,
        prompt: list[int],
        adapter: str,
        sampling: Sampling,
        stop: list[str],
        scorer: Scorer | None = None,
    ):
        self.gen, self.prompt, self.adapter, self.sampling, self.stop = gen, prompt, adapter, sampling, stop
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason = "length"
        self.before_step: Callable[[], None] | None = None
        self.scorer = scorer
        self.scores: list[tuple[TokenScore, int]] = []  # (score, offset of its text in self.text) per token
        self._handed_out = 0  # scores already taken by take_scores

    @property
    def prompt_scores(self) -> list[TokenScore | None]:
        return self.scorer.prompt_scores if self.scorer is not None else []

    def scored(self) -> list[tuple[TokenScore, int]]:
        """(score, text offset) of each generated token whose text is in ``text`` (a stop string
        cuts the tokens after it off)."""
        return [(s, o) for s, o in self.scores if o < len(self.text)]

    def take_scores(self) -> list[tuple[TokenScore, int]]:
        """The scores not taken yet, for the text streamed so far (a streamed chunk's logprobs)."""
        fresh = self.scored()[self._handed_out :]
        self._handed_out += len(fresh)
        return fresh

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def __iter__(self) -> Iterator[str]:
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be half-generated
        emitted = 0
        for token in self._tokens():
            score = self.scorer.take(token) if self.scorer is not None else None
            if token in self.gen.stop_ids:
                self.finish_reason = "stop"
                break
            if score is not None:
                self.scores.append((score, len(self.text)))
            self.tokens.append(token)
            text = self.gen.tokenizer.decode(self.tokens)
            cut = _first_stop(text, self.stop)
            if cut is not None:
                self.text, self.finish_reason = text[:cut], "stop"
                break
            self.text = text
            # Hold back a possible partial stop string and any unfinished multi-byte character.
            ready = min(len(text) - hold, len(text.rstrip("\ufffd")))
            if ready > emitted:
                yield text[emitted:ready]
                emitted = ready
        if len(self.text) > emitted:
            yield self.text[emitted:]

    def _tokens(self) -> Iterator[int]:
        """Decoder tokens; ``before_step`` (if set) runs before each decoder step and may raise to
        end the generation between two tokens (the server's timeout and client-gone checks)."""
        observe = self.scorer.observe if self.scorer is not None else None
        score_prompt = self.scorer is not None and self.scorer.prompt is not None
        steps = self.gen.decoder.generate_ids(
            self.prompt, self.adapter, self.sampling, self.gen.stop_ids, observe, score_prompt
        )
        while True:
            if self.before_step is not None:
                self.before_step()
            token = next(steps, None)
            if token is None:
                return
            yield token


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
