"""Device profiles: what a kind of device runs, read from ``devices/*.toml`` and strictly checked.

A profile names the device's architecture and operating systems, the memory edgeft may plan for,
its thread count, the ONNX Runtime execution providers to prefer for training and for serving (in
order), defaults, and the pip line that sets up one environment that trains and serves (every
profile trains: plain onnxruntime >= 1.20 and the vendor builds run the training graphs).
``edgeft.device.session.choose_providers`` turns a preference list into what a session is given on
this machine.

Profiles live in the repository's ``devices/`` folder, found next to the ``edgeft`` package (the
editable install this project uses); any other profile file can be loaded by its path.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.device.session import CPU, choose_providers
from edgeft.errors import EdgeftError

DEVICES_DIR = Path(__file__).resolve().parents[1] / "devices"
ARCHES = ("x86_64", "aarch64", "arm64")  # aarch64 and arm64 are one family (Linux vs macOS/Windows name)
OSES = ("linux", "windows", "macos")
QUANTIZATIONS = ("none", "int8", "int4")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Providers:
    """Execution providers in order of preference (ONNX Runtime's names)."""

    train: list[str]
    serve: list[str]


@dataclass(frozen=True)
class Defaults:
    max_seq_len: int
    quantization: str


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str
    os: list[str]
    ram_budget_mb: int  # peak memory edgeft may plan for
    threads: int  # 0 = all physical cores
    install: str  # pip line that sets up one environment that trains and serves
    providers: Providers
    defaults: Defaults
    notes: str = ""
    path: Path | None = field(default=None, compare=False)


def arch_family(arch: str) -> str:
    """``x86_64`` or ``arm64`` for the usual spellings (platform.machine() or a profile's arch)."""
    a = arch.lower()
    if a in ("x86_64", "amd64", "x64", "em64t"):
        return "x86_64"
    if a in ("aarch64", "arm64", "armv8", "armv8l", "aarch64_be"):
        return "arm64"
    return a


# --- validation ---------------------------------------------------------------------------------


class _Check:
    """Field checks that raise EdgeftError naming the file and the dotted field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, fld: str, problem: str) -> EdgeftError:
        return EdgeftError(f"{self.path}: field '{fld}': {problem}")

    def keys(self, table: dict, fld: str, required: set[str], optional: set[str]) -> None:
        where = f" in [{fld}]" if fld else ""
        for key in table:
            if not fld and key in _REMOVED:
                raise EdgeftError(f"{self.path}: key '{key}' is no longer used: {_REMOVED[key]}")
            if key not in required | optional:
                known = ", ".join(sorted(required | optional))
                raise EdgeftError(f"{self.path}: unknown key '{key}'{where} (known keys: {known})")
        for key in sorted(required):
            if key not in table:
                raise EdgeftError(f"{self.path}: missing required key '{f'{fld}.' if fld else ''}{key}'")

    def string(self, value: Any, fld: str, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(fld, f"expected a non-empty string, got {value!r}")
        if choices is not None and value not in choices:
            raise self.fail(fld, f"{value!r} is not one of {', '.join(choices)}")
        return value

    def integer(self, value: Any, fld: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(fld, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.fail(fld, f"must be >= {minimum}, got {value}")
        return value

    def table(self, value: Any, fld: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(fld, f"expected a table ([{fld}]), got {value!r}")
        return value

    def strings(self, value: Any, fld: str, choices: tuple[str, ...] | None = None) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(fld, f"expected a list of strings, got {value!r}")
        out = [self.string(v, fld, choices) for v in value]
        if len(set(out)) != len(out):
            raise self.fail(fld, f"lists a value twice: {out}")
        return out

    def providers(self, value: Any, fld: str) -> list[str]:
        names = self.strings(value, fld)
        for name in names:
            if not name.endswith("ExecutionProvider") or name == "ExecutionProvider":
                raise self.fail(fld, f"{name!r} is not an ONNX Runtime provider name (e.g. CUDAExecutionProvider)")
        if CPU in names and names[-1] != CPU:
            raise self.fail(fld, f"{CPU} must come last (it takes every node the others leave)")
        return names


_TOP_REQUIRED = {
    "name",
    "description",
    "arch",
    "os",
    "ram_budget_mb",
    "threads",
    "install",
    "providers",
    "defaults",
}
_TOP_OPTIONAL = {"notes"}
_REMOVED = {  # keys of older profiles, refused with what replaced them
    "training_supported": "every profile trains now (plain onnxruntime >= 1.20 runs the training graphs); delete it",
    "install_train": "'install' sets up one environment that trains and serves; delete it",
}


def parse_profile(data: dict, path: Path) -> Profile:
    """Validate the parsed TOML of ``path`` and build its Profile (EdgeftError on any problem)."""
    c = _Check(path)
    c.keys(data, "", _TOP_REQUIRED, _TOP_OPTIONAL)
    name = c.string(data["name"], "name")
    if not _NAME.match(name):
        raise c.fail("name", f"{name!r} must be lower-case letters, digits, '.', '_' or '-'")
    if path.suffix == ".toml" and name != path.stem:
        raise c.fail("name", f"{name!r} does not match the file name {path.name!r}")

    providers = c.table(data["providers"], "providers")
    c.keys(providers, "providers", {"train", "serve"}, set())
    train = c.providers(providers["train"], "providers.train")
    serve = c.providers(providers["serve"], "providers.serve")
    for fld, names in (("providers.train", train), ("providers.serve", serve)):
        if not names:
            raise c.fail(fld, "must list at least one provider (e.g. CPUExecutionProvider)")

    defaults = c.table(data["defaults"], "defaults")
    c.keys(defaults, "defaults", {"max_seq_len", "quantization"}, set())

    return Profile(
        name=name,
        description=c.string(data["description"], "description"),
        arch=c.string(data["arch"], "arch", ARCHES),
        os=_non_empty(c, c.strings(data["os"], "os", OSES), "os"),
        ram_budget_mb=c.integer(data["ram_budget_mb"], "ram_budget_mb", 1),
        threads=c.integer(data["threads"], "threads", 0),
        install=c.string(data["install"], "install"),
        providers=Providers(train=train, serve=serve),
        defaults=Defaults(
            max_seq_len=c.integer(defaults["max_seq_len"], "defaults.max_seq_len", 1),
            quantization=c.string(defaults["quantization"], "defaults.quantization", QUANTIZATIONS),
        ),
        notes=c.string(data["notes"], "notes") if "notes" in data else "",
        path=path,
    )


def _non_empty(c: _Check, values: list[str], fld: str) -> list[str]:
    if not values:
        raise c.fail(fld, "must not be empty")
    return values


# --- loading --------------------------------------------------------------------------------------


def _available() -> list[str]:
    return sorted(p.stem for p in DEVICES_DIR.glob("*.toml")) if DEVICES_DIR.is_dir() else []


def _read(path: Path) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise EdgeftError(f"{path}: cannot read device profile: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EdgeftError(f"{path}: not valid TOML: {e}") from None
    return parse_profile(data, path)


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``devices/NAME.toml``) or by the path of any profile file."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgeftError(f"{path}: no such device profile file")
        return _read(path)
    path = DEVICES_DIR / f"{text}.toml"
    if not path.is_file():
        available = _available()
        listed = ", ".join(available) if available else f"none ({DEVICES_DIR} has no profiles)"
        raise EdgeftError(f"unknown device profile {text!r}; available: {listed}")
    return _read(path)


def list_profiles() -> list[Profile]:
    """Every profile in ``devices/``, sorted by name (a broken file raises, naming itself)."""
    if not DEVICES_DIR.is_dir():
        raise EdgeftError(f"{DEVICES_DIR}: no device profile folder (edgeft is meant to run from its checkout)")
    return [_read(DEVICES_DIR / f"{name}.toml") for name in _available()]


def profiles_table(profiles: list[Profile]) -> str:
    """A plain-text table: name, arch, OS, train and serve providers (in order of preference)."""
    short = _short_providers
    rows = [("NAME", "ARCH", "OS", "TRAIN ON", "SERVE ON")]
    rows += [(p.name, p.arch, ",".join(p.os), short(p.providers.train), short(p.providers.serve)) for p in profiles]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows)


def _short_providers(names: list[str]) -> str:
    return ", ".join(n.removesuffix("ExecutionProvider") for n in names)


# --- what a profile sets for a command -------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeSettings:
    """Threads, execution provider and memory budget for one command, after a profile is applied."""

    threads: int | None
    provider: str | None  # first choice for ONNX Runtime; None = edgeft's default
    memory_budget_mb: float | None
    max_seq_len: int | None


def runtime_settings(
    profile_name: str | None,
    role: str,
    threads: int | None = None,
    provider: str | None = None,
    memory_budget_mb: float | None = None,
) -> RuntimeSettings:
    """Explicit options win; then the profile (``role`` is "train" or "serve"); then defaults.
    A preferred provider that this onnxruntime lacks falls back to CPU with a message on stderr."""
    if profile_name is None:
        return RuntimeSettings(threads, provider, memory_budget_mb, None)
    profile = load_profile(profile_name)
    if provider is None:
        preference = profile.providers.train if role == "train" else profile.providers.serve
        chosen, message = choose_providers(preference, _available_providers())
        if message:
            print(f"edgeft: profile {profile.name}: {message}", file=sys.stderr)
        provider = chosen[0]
    return RuntimeSettings(
        threads or (profile.threads or None),
        provider,
        memory_budget_mb or float(profile.ram_budget_mb),
        profile.defaults.max_seq_len,
    )


def _available_providers() -> list[str]:
    from edgeft.device.session import onnxruntime

    return onnxruntime().get_available_providers()
