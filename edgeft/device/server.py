"""Device stage: an OpenAI-compatible HTTP server over one bundle. Entry for the CLI: :func:`serve`.

One ONNX Runtime session serves the base model and every adapter (the request's ``model`` picks
the adapter). Generation runs on a single worker thread, so the session is never run from two
threads at once and the event loop never blocks; at most ``max_queue`` generations wait or run,
more are refused at once with 503 so a small device does not pile up work it cannot finish.
Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so OpenAI
clients raise their usual exceptions.

A classification bundle (``export --task seq-cls|token-cls``) is served the same way through
``POST /v1/classify`` (labels with probabilities, or entities with spans): the same model ids,
adapters, queue, limits and error shape; the completion endpoints answer 400 for it, and
``/v1/classify`` answers 400 for a causal-lm bundle.

Limits, so one client cannot tie the device up: request bodies over ``max_body_bytes`` get 413
(from Content-Length, or counted while a chunked body is read), prompts over ``max_prompt_chars``
get 400, and a request still generating ``request_timeout`` seconds after it arrived is stopped
between two tokens (504, or a streamed error event). The server binds 127.0.0.1 unless told
otherwise, and refuses a non-loopback address without an API key unless ``insecure`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from edgeft.bundle import Bundle
from edgeft.device.classify import Classifier
from edgeft.device.decoder import BASE, Sampling
from edgeft.device.generate import Stream, TextGenerator
from edgeft.errors import EdgeftError
from edgeft.tasks import Task

Engine = TextGenerator | Classifier  # a causal-lm bundle generates; a classification bundle classifies
MAX_CLASSIFY_INPUTS = 64  # texts per /v1/classify request


@dataclass
class ServeConfig:
    bundle: Path
    adapters: dict[str, Path] = field(default_factory=dict)  # model id -> PEFT adapter directory
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 8
    provider: str | None = None
    threads: int | None = None
    insecure: bool = False  # allow a non-loopback host without an API key
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 64 << 10
    request_timeout: float = 60.0  # seconds from arrival to the last token
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)
    profile: str | None = None  # device profile: serving providers and threads


def serve(cfg: ServeConfig) -> None:
    """Load the bundle and adapters once, then serve until interrupted."""
    import uvicorn

    from edgeft.profiles import runtime_settings

    check_host(cfg.host, cfg.api_key, cfg.insecure)
    _check_limits(cfg.max_queue, cfg.max_body_bytes, cfg.max_prompt_chars, cfg.request_timeout)
    settings = runtime_settings(cfg.profile, "serve", cfg.threads, cfg.provider)
    bundle = Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key)
    kind = Classifier if Task.of(bundle.manifest).is_classification else TextGenerator
    generator = kind(bundle, settings.provider, settings.threads)
    base_id = base_model_id(generator)
    for name, path in cfg.adapters.items():
        # An adapter named like the base would shadow it (or replace the zero "base" LoRA).
        if name in (base_id, BASE):
            raise EdgeftError(f"--adapter {name}={path}: the name {name!r} is taken by the base model")
        _add_adapter(generator, name, path)
    app = create_app(
        generator,
        cfg.api_key,
        cfg.max_queue,
        max_body_bytes=cfg.max_body_bytes,
        max_prompt_chars=cfg.max_prompt_chars,
        request_timeout=cfg.request_timeout,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or an address in 127.0.0.0/8 or ::1."""
    name = host.strip().removeprefix("[").removesuffix("]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # another host name, or "" (all interfaces): not provably local
        return False


def check_host(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to expose the server beyond this machine with no key, unless told to."""
    if api_key or insecure or is_loopback(host):
        return
    raise EdgeftError(
        f"--host {host!r} is not a loopback address, so other machines could use this server: "
        "set --api-key (or EDGEFT_API_KEY) to require a key, or pass --insecure to serve without one"
    )


def _check_limits(max_queue: int, max_body_bytes: int, max_prompt_chars: int, request_timeout: float) -> None:
    if max_queue < 1:
        raise EdgeftError("--max-queue must be at least 1")
    if max_body_bytes < 1:
        raise EdgeftError("--max-body-bytes must be at least 1")
    if max_prompt_chars < 1:
        raise EdgeftError("--max-prompt-chars must be at least 1")
    if not request_timeout > 0:
        raise EdgeftError("--request-timeout must be more than 0 seconds")


def base_model_id(generator: Engine) -> str:
    return str(generator.bundle.manifest.get("base_model") or BASE)


def _adapters(engine: Engine) -> dict:
    return engine.adapters if isinstance(engine, Classifier) else engine.decoder.adapters


def _add_adapter(engine: Engine, name: str, path: Path) -> None:
    if isinstance(engine, Classifier):
        engine.add_adapter(name, path)
    else:
        engine.decoder.add_adapter(name, path)


# ---------------------------------------------------------------------------------------------
# Request bodies. Unknown fields are ignored, as OpenAI clients send some we do not use (user,
# logit_bias...); only n > 1 is refused, since it would change the reply's shape. Log-probabilities
# are capped as OpenAI caps them: 5 alternatives per token for completions, 20 for chat.

MAX_LOGPROBS = 5  # /v1/completions `logprobs`
MAX_PROMPTS = 64  # prompts per /v1/completions request, generated one after another
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions `top_logprobs`


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 means greedy here
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, but vLLM and llama.cpp take it too
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI treats an explicit null like an absent field; some clients send nulls.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.get("include_usage"))

    def limit(self, room: int) -> int:
        """Tokens to generate at most, with ``room`` tokens left in the context."""
        raise NotImplementedError


class CompletionRequest(_Sampled):
    # A string or token ids (lm-evaluation-harness sends [[ids]]), or a list of prompts (OpenAI's batch form).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo scores the prompt only
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    def limit(self, room: int) -> int:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids; several only without ``stream``."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            return [list(prompt)]
        if not 1 <= len(prompt) <= MAX_PROMPTS:
            raise ApiError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(prompt)}", param="prompt")
        if len(prompt) > 1 and self.stream:
            raise ApiError(400, "a streamed completion takes one prompt", param="prompt")
        return [p if isinstance(p, str) else list(p) for p in prompt]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str | None) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content or ""}


class ClassifyRequest(BaseModel):
    """``POST /v1/classify``: one text or a list of texts, classified with the adapter ``model``."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str]
    truncate: bool = False  # cut texts over the bundle's max_seq_len instead of answering 400

    def texts(self) -> list[str]:
        texts = [self.input] if isinstance(self.input, str) else list(self.input)
        if not 1 <= len(texts) <= MAX_CLASSIFY_INPUTS:
            raise ApiError(400, f"input must hold 1 to {MAX_CLASSIFY_INPUTS} texts, got {len(texts)}", param="input")
        return texts


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def limit(self, room: int) -> int:
        # OpenAI's chat default is "whatever fits": the rest of the context.
        return self.max_completion_tokens or self.max_tokens or room


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """FastAPI's 422 list of problems -> one OpenAI-style 400 naming the first field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"We could not parse the JSON body of your request ({first.get('msg')})")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return ApiError(400, f"{param or 'body'}: {first.get('msg')}", param=param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(EdgeftError)
    async def _edgeft(_request: Request, exc: EdgeftError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return exc.error().response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()


class ApiKeyMiddleware:
    """``Authorization: Bearer KEY`` on every path but /health. Checked before the body is read,
    so an unauthenticated client learns nothing about request validation."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(401, "Incorrect or missing API key", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body outgrows the limit. An HTTPException, so FastAPI passes
    it on from its body parsing instead of turning it into "error parsing the body" (400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (--max-body-bytes)")

    def error(self) -> ApiError:
        return ApiError(413, str(self.detail), code="request_too_large")


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once from Content-Length, else counted as a chunked
    body arrives, so an oversized body is never held in memory whole."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await _BodyTooLarge(self.max_bytes).error().response()(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except _BodyTooLarge as e:
            # Normally answered by the app's exception handler; this covers a body read elsewhere.
            if started:
                raise
            await e.error().response()(scope, receive, send)


# ---------------------------------------------------------------------------------------------
# Generation: a single worker thread and a bounded count of waiting/running jobs.


class Worker:
    """Runs generations one at a time off the event loop; refuses work beyond ``max_queue``."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.pending = 0  # only touched on the event loop thread, so no lock
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeft-generate")

    def submit(self, job: Callable[[], Any]) -> asyncio.Future:
        """Queue ``job``; its slot is freed when the job really ends (or is cancelled before it
        starts), not when an awaiting coroutine gives up on it."""
        if self.pending >= self.max_queue:
            raise ApiError(
                503,
                f"the server is busy ({self.pending} requests queued); retry later",
                "server_error",
                code="overloaded",
            )
        loop = asyncio.get_running_loop()
        done = self.executor.submit(job)
        self.pending += 1
        done.add_done_callback(lambda _f: self._release_on(loop))
        # Cancelling the returned future cancels the job only if it has not started yet.
        return asyncio.wrap_future(done, loop=loop)

    def _release_on(self, loop: asyncio.AbstractEventLoop) -> None:
        # ``pending`` is only touched on the loop; a closed loop means the server is gone.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._release)

    def _release(self) -> None:
        self.pending -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class Job:
    """One accepted request, ready to run: its Stream and how to shape its response."""

    stream: Stream
    model: str
    chat: bool
    streaming: bool
    include_usage: bool
    timeout: float = 60.0
    logprobs: int | None = None  # completions: top-N per token; chat: top_logprobs (None: no logprobs)
    echo: str | None = None  # completions with echo: the prompt's text, which the reply's text starts with
    deadline: float = 0.0  # time.monotonic() by which the last token must be out
    id: str = ""
    created: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = self.deadline or time.monotonic() + self.timeout
        self.stream.before_step = self.check  # runs before every decoder step

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Between two tokens (and before the first): stop if the client left or time is up."""
        if self.cancelled.is_set():
            raise _Cancelled
        if self.remaining() <= 0:
            raise _TimedOut

    def timeout_error(self) -> ApiError:
        return ApiError(
            504,
            f"the request took longer than {self.timeout:g} s (--request-timeout); generation was stopped",
            "server_error",
            code="timeout",
        )

    def usage(self) -> dict[str, int]:
        s = self.stream
        return {
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
        }

    def body(self) -> dict[str, Any]:
        """The non-streaming response."""
        s = self.stream
        scored = s.scored()
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": s.text}, "logprobs": self._chat(scored)}
        else:
            text = (self.echo or "") + s.text
            choice = {"index": 0, "text": text, "logprobs": self._legacy(scored, prompt=self.echo is not None)}
        choice["finish_reason"] = s.finish_reason
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": self.usage()}

    def chunk(
        self, text: str | None, finish_reason: str | None = None, role: bool = False, scored=(), prompt: bool = False
    ) -> str:
        """One server-sent event in OpenAI's chunk format; ``scored``: its tokens' (score, offset),
        ``prompt``: the echoed prompt's chunk (its tokens' scores)."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            logprobs = self._chat(scored) if scored else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            logprobs = self._legacy(scored, prompt) if scored or prompt else None
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        body = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if self.include_usage:
            body["usage"] = None  # OpenAI sets usage only on the extra last chunk
        return _sse(body)

    def _legacy(self, scored, prompt: bool) -> dict[str, list] | None:
        """Completions' ``logprobs``: OpenAI's legacy shape, the echoed prompt's tokens first (the
        first one's log-probability null); ``top_logprobs`` holds the N most likely tokens and the
        chosen one (OpenAI: up to N + 1 entries)."""
        if self.logprobs is None:
            return None
        gen = self.stream.gen
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(token: int, score, offset: int) -> None:
            out["tokens"].append(gen.token_text(token))
            out["token_logprobs"].append(score.logprob if score else None)
            top = None
            if score is not None:  # two tokens may read the same (partial characters): the likelier one stays
                top = {}
                for t, lp in [*score.top, (score.token, score.logprob)]:
                    top.setdefault(gen.token_text(t), lp)
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)

        base = 0
        if prompt:
            ids = self.stream.prompt
            offsets = gen.prefix_offsets(ids, len(self.echo or ""))
            for token, score, offset in zip(ids, self.stream.prompt_scores or [None] * len(ids), offsets, strict=True):
                add(token, score, offset)
            base = len(self.echo or "")
        for score, offset in scored:
            add(score.token, score, base + offset)
        return out

    def _chat(self, scored) -> dict[str, list] | None:
        """Chat's ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        if self.logprobs is None:
            return None
        gen = self.stream.gen

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = gen.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top]} for s, _ in scored]
        return {"content": content, "refusal": None}

    def usage_chunk(self) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse({**self._head(obj), "choices": [], "usage": self.usage()})

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


class _Stop(Exception):
    """Raised between tokens to end a generation early."""


class _Cancelled(_Stop):
    pass


class _TimedOut(_Stop):
    pass


def _drain(stream: Stream) -> BaseException | None:
    """Run a whole generation on the worker; the error it ended with, if any (returned, not raised,
    so a result nobody awaits any more is not logged as "never retrieved")."""
    try:
        for _ in stream:
            pass
    except Exception as e:  # noqa: BLE001 - handed to the loop, which answers it
        return e
    return None


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


_DONE = "data: [DONE]\n\n"


class Server:
    """The routes' state: the generator (or classifier), the model ids, the worker."""

    def __init__(self, generator: Engine, max_queue: int, max_prompt_chars: int, request_timeout: float):
        self.generator = generator
        self.base_id = base_model_id(generator)
        self.worker = Worker(max_queue)
        self.max_prompt_chars = max_prompt_chars
        self.request_timeout = request_timeout

    def model_ids(self) -> list[str]:
        return [self.base_id, *(n for n in _adapters(self.generator) if n not in (BASE, self.base_id))]

    def adapter_for(self, model: str) -> str:
        if model in (self.base_id, BASE):
            return BASE
        if model in _adapters(self.generator):
            return model
        raise ApiError(
            404, f"The model '{model}' does not exist (served: {', '.join(self.model_ids())})", param="model",
            code="model_not_found",
        )  # fmt: skip

    async def prepare(
        self, req: _Sampled, prompt: str | list[int] | None, messages: list[dict] | None, chat: bool
    ) -> Job:
        """Validate and tokenize (in a thread pool, not the generation worker: a bad or long
        prompt is answered without waiting behind other generations). ``prompt``: text or token ids."""
        if isinstance(self.generator, Classifier):
            task = self.generator.task.type
            raise ApiError(400, f"this bundle is a {task} classifier: use POST /v1/classify", code="wrong_endpoint")
        deadline = time.monotonic() + self.request_timeout
        adapter = self.adapter_for(req.model)
        self.check_prompt_chars(prompt, messages)
        if isinstance(prompt, list):
            ids = self.generator.check_ids(prompt)
        else:
            ids = await run_in_threadpool(self.generator.encode, prompt, messages)
        room = self.generator.bundle.max_seq_len - len(ids)
        sampling = Sampling(req.limit(room), req.temperature, req.top_k, req.top_p, req.seed)
        if isinstance(req, ChatRequest):
            top_n, echo = ((req.top_logprobs or 0) if req.logprobs else None), None
        else:
            top_n = req.logprobs
            echo = None
            if req.echo:
                echo = prompt if isinstance(prompt, str) else self.generator.tokenizer.decode(ids)
        # TextGenerator.stream caps max_new_tokens at the room left in the context.
        score_prompt = echo is not None and top_n is not None
        stream = self.generator.stream(ids, adapter, sampling, req.stops(), top_n, score_prompt)
        return Job(
            stream, req.model, chat, req.stream, req.include_usage(), self.request_timeout,
            deadline=deadline, logprobs=top_n, echo=echo,
        )  # fmt: skip

    async def classify(self, req: ClassifyRequest) -> dict[str, Any]:
        """Validate and tokenize in the thread pool, classify on the worker (the queue, its 503 and
        the request timeout apply as to generations)."""
        clf = self.generator
        if not isinstance(clf, Classifier):
            raise ApiError(
                400,
                "this bundle generates text (causal-lm); /v1/classify needs a bundle exported with "
                "--task seq-cls or token-cls",
                code="wrong_endpoint",
            )
        deadline = time.monotonic() + self.request_timeout
        adapter = self.adapter_for(req.model)
        texts = req.texts()
        for i, text in enumerate(texts):
            if len(text) > self.max_prompt_chars:
                raise ApiError(
                    400,
                    f"input[{i}] has {len(text)} characters; this server takes at most {self.max_prompt_chars}",
                    param="input",
                    code="prompt_too_long",
                )

        def encode() -> list:
            out = []
            for i, text in enumerate(texts):
                try:
                    out.append(clf.encode(text, req.truncate))
                except EdgeftError as e:
                    raise ApiError(400, f"input[{i}]: {e}", param="input") from None
            return out

        examples = await run_in_threadpool(encode)
        future = self.worker.submit(lambda: clf.predictions(examples, adapter))
        done, _ = await asyncio.wait({future}, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            future.cancel()  # a queued job never starts; a running one is a single forward pass
            raise ApiError(
                504,
                f"the request took longer than {self.request_timeout:g} s (--request-timeout)",
                "server_error",
                code="timeout",
            )
        results = future.result()
        data = [{"object": "classification", "index": i, **result} for i, result in enumerate(results)]
        tokens = sum(len(ex.input_ids) for ex in examples)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "model": req.model, "task": clf.task.type, "data": data, "usage": usage}

    def check_prompt_chars(self, prompt: str | list[int] | None, messages: list[dict] | None) -> None:
        chars = len(prompt) if prompt is not None else sum(len(m["content"]) for m in messages or [])
        if chars > self.max_prompt_chars:
            raise ApiError(
                400,
                f"the prompt has {chars} characters; this server takes at most {self.max_prompt_chars}",
                param="messages" if prompt is None else "prompt",
                code="prompt_too_long",
            )

    async def respond(self, job: Job) -> JSONResponse | StreamingResponse:
        if job.streaming:
            return await self._stream(job)
        await self._generate([job])
        return JSONResponse(job.body())

    async def respond_all(self, jobs: list[Job]) -> JSONResponse:
        """A completions request with several prompts: one response, a choice per prompt in order."""
        await self._generate(jobs)
        bodies = [job.body() for job in jobs]
        usage = {k: sum(b["usage"][k] for b in bodies) for k in bodies[0]["usage"]}
        choices = [{**b["choices"][0], "index": i} for i, b in enumerate(bodies)]
        return JSONResponse({**bodies[0], "choices": choices, "usage": usage})

    async def _generate(self, jobs: list[Job]) -> None:
        """Run the jobs' generations one after another as one worker job (one queue slot), within
        the first one's deadline."""

        def run() -> BaseException | None:
            for job in jobs:
                error = _drain(job.stream)
                if error is not None:
                    return error
            return None

        future = self.worker.submit(run)
        done, _ = await asyncio.wait({future}, timeout=max(jobs[0].remaining(), 0))
        if not done:
            for job in jobs:
                job.cancelled.set()  # a running generation stops at its next token...
            future.cancel()  # ...and a queued one never starts (its slot is freed now)
            raise jobs[0].timeout_error()
        error = future.result()
        if isinstance(error, _TimedOut):
            raise jobs[0].timeout_error()
        if error is not None:
            raise error

    async def _stream(self, job: Job) -> StreamingResponse:
        """Generate on the worker, hand pieces to the loop through an asyncio queue. The first
        item is awaited before answering, so an error at prefill is still a proper HTTP error."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(item: tuple[str, Any]) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                job.cancelled.set()

        def produce() -> None:
            try:
                for piece in job.stream:
                    emit(("piece", (piece, job.stream.take_scores())))
                emit(("done", job.stream.take_scores()))
            except _Cancelled:  # the client went away: nobody to tell
                pass
            except Exception as e:  # noqa: BLE001 - handed to the loop, which answers it
                emit(("error", e))

        self.worker.submit(produce)
        try:
            first = await _next_item(items, job)
        except BaseException:
            job.cancelled.set()
            raise
        if first[0] == "error":
            raise job.timeout_error() if isinstance(first[1], _TimedOut) else first[1]
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_events(job, first, items), media_type="text/event-stream", headers=headers)


async def _next_item(items: asyncio.Queue, job: Job) -> tuple[str, Any]:
    """The worker's next item, or a timeout error once the request's time is up."""
    if not items.empty():
        return items.get_nowait()
    try:
        return await asyncio.wait_for(items.get(), max(job.remaining(), 0))
    except TimeoutError:
        job.cancelled.set()  # the worker stops at its next token
        return ("error", _TimedOut())


async def _events(job: Job, first: tuple[str, Any], items: asyncio.Queue) -> AsyncIterator[str]:
    try:
        if job.chat:
            yield job.chunk("", role=True)  # OpenAI opens a chat stream with the role
        elif job.echo is not None:  # the prompt (scored at prefill, before the first item) comes first
            yield job.chunk(job.echo, prompt=True)
        item = first
        while item[0] == "piece":
            yield job.chunk(item[1][0], scored=item[1][1])
            item = await _next_item(items, job)
        if item[0] == "error" and isinstance(item[1], _TimedOut):
            # Cut short like a length limit, then say why; OpenAI clients raise on the error event.
            yield job.chunk(None, "length")
            yield _sse(_error_body(job.timeout_error()))
        elif item[0] == "error":
            # Headers are sent already; OpenAI clients raise on an "error" event.
            yield _sse(_error_body(item[1]))
        else:
            yield job.chunk(None, job.stream.finish_reason, scored=item[1] or ())
            if job.include_usage:
                yield job.usage_chunk()
        yield _DONE
    finally:
        job.cancelled.set()


def _error_body(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ApiError):
        return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    kind = "invalid_request_error" if isinstance(exc, EdgeftError) else "server_error"
    return {"error": {"message": str(exc), "type": kind, "param": None, "code": None}}


# ---------------------------------------------------------------------------------------------
# The app


def create_app(
    generator: Engine,
    api_key: str | None = None,
    max_queue: int = 8,
    *,
    max_body_bytes: int = 1 << 20,
    max_prompt_chars: int = 64 << 10,
    request_timeout: float = 60.0,
) -> FastAPI:
    """The OpenAI-compatible app over ``generator`` (its adapters are the models): a TextGenerator,
    or a Classifier for a classification bundle (``/v1/classify``)."""
    _check_limits(max_queue, max_body_bytes, max_prompt_chars, request_timeout)
    server = Server(generator, max_queue, max_prompt_chars, request_timeout)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        server.worker.shutdown()

    app = FastAPI(title="edgeft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key:  # added last, so outermost: checked before anything about the body
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "edgeft"} for m in server.model_ids()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        jobs = [await server.prepare(req, prompt, None, chat=False) for prompt in req.prompts()]
        return await (server.respond(jobs[0]) if len(jobs) == 1 else server.respond_all(jobs))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [m.as_template_input() for m in req.messages]
        job = await server.prepare(req, None, messages, chat=True)
        return await server.respond(job)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        return await server.classify(req)

    return app
