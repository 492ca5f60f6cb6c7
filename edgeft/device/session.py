"""One way to open any graph of a bundle with onnxruntime: providers, threads, options.

Plain onnxruntime (>= 1.20) runs every graph; the host venv's training build (1.19) runs the same
graphs. Provider resolution lives here only: ``choose_providers`` turns a preference list into what
a session is given, and both ``resolve_providers`` (``--provider``) and ``edgeft.profiles`` (a
profile's preferences) go through it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import EdgeftError

CPU = "CPUExecutionProvider"
PROVIDER_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
}


def onnxruntime():
    """The onnxruntime module with its log noise turned down to errors."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


@dataclass
class SessionConfig:
    """How a session is opened; benchmarks pass overrides here instead of patching module globals."""

    provider: str | None = None  # an execution provider name or alias; None = best available
    threads: int | None = None  # intra-op threads; None = onnxruntime's default (all cores)
    deterministic: bool = True
    mem_pattern: bool = True
    mem_reuse: bool = True  # onnxruntime's planned buffer reuse between tensors
    disabled_optimizers: list[str] = field(default_factory=list)
    config_entries: dict[str, str] = field(default_factory=dict)  # SessionOptions.add_session_config_entry


def provider_name(requested: str) -> str:
    return requested if requested.endswith("ExecutionProvider") else PROVIDER_ALIASES.get(requested.lower(), requested)


def choose_providers(preference: list[str], available: list[str]) -> tuple[list[str], str | None]:
    """Providers to give ONNX Runtime, and a message when the first preferred one is missing.

    Keeps the available ones of ``preference`` in its order and always ends with the CPU provider
    (ONNX Runtime places each node on the first provider in the list that supports it).
    """
    chosen = [p for p in preference if p in available and p != CPU]
    chosen.append(CPU)
    missing = [p for p in preference if p not in available and p != CPU]
    if not preference or preference[0] in chosen:
        return chosen, None
    shown = ", ".join(available) if available else "none"
    return chosen, (
        f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not available here "
        f"(this onnxruntime has: {shown}); using {chosen[0]}"
    )


def resolve_providers(requested: str | None) -> list[str]:
    """``requested`` (plus the CPU fallback) if this onnxruntime has it, else CPU with a message;
    without a request, CUDA when available, then CPU."""
    available = onnxruntime().get_available_providers()
    if requested:
        chosen, missing = choose_providers([provider_name(requested)], available)
        if missing:
            print(
                f"edgeft: provider {requested} is not available here ({', '.join(available)}); using CPU",
                file=sys.stderr,
            )
        return chosen
    return choose_providers(["CUDAExecutionProvider", CPU], available)[0]


def session_options(cfg: SessionConfig):
    ort = onnxruntime()
    opts = ort.SessionOptions()
    if cfg.threads:
        opts.intra_op_num_threads = cfg.threads
    opts.inter_op_num_threads = 1
    opts.use_deterministic_compute = cfg.deterministic
    opts.enable_mem_pattern = cfg.mem_pattern
    opts.enable_mem_reuse = cfg.mem_reuse
    opts.log_severity_level = 3
    for key, value in cfg.config_entries.items():
        opts.add_session_config_entry(key, value)
    return opts


def open_session(path: Path, cfg: SessionConfig, initializers: dict | None = None):
    """An InferenceSession over ``path``. ``initializers`` ({name: CPU OrtValue}) replace the graph's
    external-data initializers of those names with memory the caller owns and may share."""
    ort = onnxruntime()
    opts = session_options(cfg)
    for name, value in (initializers or {}).items():
        opts.add_initializer(name, value)
    try:
        return ort.InferenceSession(
            str(path),
            opts,
            providers=resolve_providers(cfg.provider),
            disabled_optimizers=cfg.disabled_optimizers or None,
        )
    except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        raise EdgeftError(f"{path}: onnxruntime {ort.__version__} cannot load this graph ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
