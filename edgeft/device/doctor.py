"""``edgeft devices check``: what this machine is, which ONNX Runtime it has, what a profile gets here.

Reads only what is cheap and safe: platform, /proc and /sys on Linux, package metadata, and the
``onnxruntime`` module itself. ``onnxruntime.training`` is looked up with find_spec, never imported
(its ``__init__`` imports torch). Note that the training build's own ``import onnxruntime`` tries
``onnxruntime.training.ortmodule``, which loads torch wherever torch happens to be installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from edgeft.device.session import choose_providers
from edgeft.profiles import Profile, arch_family

_OS_NAMES = {"linux": "linux", "windows": "windows", "darwin": "macos"}
_MIN_PLAIN_ORT = (1, 20)  # what serving needs without the training build (setup.cfg's serve extra)


def check(profile: Profile | None = None) -> dict[str, Any]:
    """A JSON-ready report on this machine and, given a profile, what that profile gets here."""
    machine = _machine()
    ort = _onnxruntime()
    report: dict[str, Any] = {
        "machine": machine,
        "onnxruntime": ort,
        "training_possible": ort["training_api"],
        "profile": None,
        "train": None,
        "serve": None,
        "warnings": _general_warnings(machine, ort),
    }
    if profile is not None:
        _with_profile(report, profile)
    return report


# --- the machine ------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    arch = platform.machine()
    total, available = _ram_mb()
    return {
        "arch": arch,
        "arch_family": arch_family(arch),
        "os": _OS_NAMES.get(platform.system().lower(), platform.system().lower()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ram_total_mb": total,
        "ram_available_mb": available,
        "memory_limit_mb": _cgroup_limit_mb(),
        "cpu_logical": os.cpu_count(),
        "cpu_physical": _physical_cores(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "nvidia_driver": _nvidia_driver(),
    }


def _ram_mb() -> tuple[int | None, int | None]:
    """(total, available) RAM in MB: /proc/meminfo on Linux, sysconf or the Windows API elsewhere."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0])  # kB
        total = info.get("MemTotal")
        available = info.get("MemAvailable")
        return (total // 1024 if total else None), (available // 1024 if available else None)
    except (OSError, ValueError, IndexError):
        pass
    try:  # macOS and other POSIX systems
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return (total // 2**20 if total > 0 else None), None
    except (AttributeError, ValueError, OSError):
        pass
    if sys.platform == "win32":
        try:
            import ctypes

            class _Status(ctypes.Structure):
                _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong)] + [
                    (n, ctypes.c_ulonglong)
                    for n in ("total", "avail", "page_total", "page_avail", "virt_total", "virt_avail", "ext")
                ]

            status = _Status(dwLength=ctypes.sizeof(_Status))
            if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                return status.total // 2**20, status.avail // 2**20
        except Exception:
            pass
    return None, None


def _cgroup_limit_mb() -> int | None:
    """A container's memory limit (cgroup v2, then v1), when one is set below the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # v1 reports "no limit" as a huge number
            return int(value) // 2**20
    return None


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs from Linux sysfs, else /proc/cpuinfo; None when unknown."""
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    if cores:
        return len(cores)
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return None
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver (desktop/server) or L4T release (Jetson), Linux only."""
    for path in ("/proc/driver/nvidia/version", "/etc/nv_tegra_release"):
        try:
            return Path(path).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
    return None


# --- onnxruntime ------------------------------------------------------------------------------------


def _onnxruntime() -> dict[str, Any]:
    dists = _ort_distributions()
    info: dict[str, Any] = {
        "distribution": dists[0][0] if dists else None,
        "distributions": [f"{name}=={version}" for name, version in dists],
        "flavour": "none",
        "version": dists[0][1] if dists else None,
        "providers": [],
        "cuda_version": None,
        "training_api": False,
        "import_error": None,
    }
    if importlib.util.find_spec("onnxruntime") is None:
        return info
    try:
        import onnxruntime as ort
    except Exception as e:  # a broken install: report it rather than fail
        info["import_error"] = f"{type(e).__name__}: {e}"
        info["flavour"] = "broken"
        return info
    info["version"] = getattr(ort, "__version__", info["version"])
    info["providers"] = list(ort.get_available_providers())
    info["cuda_version"] = getattr(ort, "cuda_version", None) or None
    # The on-device training API: the training package on disk (not imported) and its C++ Module.
    state = getattr(getattr(ort, "capi", None), "_pybind_state", None)
    info["training_api"] = importlib.util.find_spec("onnxruntime.training") is not None and hasattr(state, "Module")
    name = (info["distribution"] or "").lower().replace("_", "-")
    info["flavour"] = "training" if name.startswith("onnxruntime-training") or info["training_api"] else "inference"
    return info


def _ort_distributions() -> list[tuple[str, str]]:
    """Installed distributions that provide the ``onnxruntime`` module, as (name, version)."""
    names = importlib.metadata.packages_distributions().get("onnxruntime", [])
    out = []
    for name in dict.fromkeys(names):
        try:
            out.append((importlib.metadata.distribution(name).metadata["Name"], importlib.metadata.version(name)))
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _general_warnings(machine: dict, ort: dict) -> list[str]:
    warnings = []
    if len(ort["distributions"]) > 1:
        warnings.append(
            f"several packages provide the onnxruntime module ({', '.join(ort['distributions'])}); they overwrite "
            "each other's files: uninstall all of them and install one"
        )
    if ort["import_error"]:
        warnings.append(f"onnxruntime is installed but does not import: {ort['import_error']}")
    if ort["flavour"] == "inference" and ort["version"] and _version(ort["version"]) < _MIN_PLAIN_ORT:
        warnings.append(f"serving with plain onnxruntime needs >= 1.20; this is {ort['version']}")
    limit, total = machine["memory_limit_mb"], machine["ram_total_mb"]
    if limit is not None and total is not None and limit < total:
        warnings.append(f"this process is limited to {limit} MB by its cgroup (the machine has {total} MB)")
    return warnings


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


# --- with a profile ---------------------------------------------------------------------------------


def _with_profile(report: dict, profile: Profile) -> None:
    machine, ort, warnings = report["machine"], report["onnxruntime"], report["warnings"]
    report["profile"] = {
        "name": profile.name,
        "path": str(profile.path) if profile.path else None,
        "arch": profile.arch,
        "os": profile.os,
        "training_supported": profile.training_supported,
        "ram_budget_mb": profile.ram_budget_mb,
        "threads": profile.threads or machine["cpu_physical"] or machine["cpu_logical"],
    }
    matches = arch_family(profile.arch) == machine["arch_family"] and machine["os"] in profile.os
    if arch_family(profile.arch) != machine["arch_family"]:
        warnings.append(f"profile {profile.name} is for {profile.arch}; this machine is {machine['arch']}")
    if machine["os"] not in profile.os:
        warnings.append(f"profile {profile.name} is for {'/'.join(profile.os)}; this machine runs {machine['os']}")
    memory = [m for m in (machine["ram_total_mb"], machine["memory_limit_mb"]) if m is not None]
    if memory and min(memory) < profile.ram_budget_mb:
        warnings.append(
            f"profile {profile.name} plans for up to {profile.ram_budget_mb} MB; this machine has {min(memory)} MB"
        )
    if profile.threads and machine["cpu_logical"] and profile.threads > machine["cpu_logical"]:
        warnings.append(
            f"profile {profile.name} asks for {profile.threads} threads; this machine has {machine['cpu_logical']}"
        )

    has_ort = ort["flavour"] in ("training", "inference")
    installed = [d.split("==")[0] for d in ort["distributions"]]
    separate = profile.install_train is not None  # serving and training builds need two environments

    def hint(what: str, line: str, fresh_env: bool = False) -> str:
        """The pip line, after removing the onnxruntime build it replaces (two builds overwrite each other)."""
        if not matches:  # no pip line for a machine the profile is not meant for
            return ""
        if fresh_env:
            return f"; {what}, in a separate virtual environment: {line}"
        stale = [n for n in installed if not re.search(rf"pip uninstall -y {re.escape(n)}(\s|$)", line)]
        first = f"pip uninstall -y {' '.join(stale)} && " if stale else ""
        return f"; {what}: {first}{line}"

    if profile.training_supported:
        train = report["train"] = _uses(profile.providers.train, ort, machine) if ort["training_api"] else None
        if train is None:
            why = f"this onnxruntime ({ort['distribution']} {ort['version']}) has no training API"
            why = why if has_ort else "onnxruntime is not installed"
            warnings.append(f"training: {why}{hint('to train here', profile.train_install, separate)}")
        elif train["note"]:
            what = f"for {profile.providers.train[0]}"
            warnings.append(f"training: {train['note']}{hint(what, profile.train_install, separate)}")
    serve = report["serve"] = _uses(profile.providers.serve, ort, machine) if has_ort else None
    if serve is None:
        warnings.append(f"serving: onnxruntime is not installed{hint('to serve here', profile.install)}")
    elif serve["note"]:
        what = f"for {profile.providers.serve[0]}"
        warnings.append(f"serving: {serve['note']}{hint(what, profile.install, separate)}")


def _uses(preference: list[str], ort: dict, machine: dict) -> dict[str, Any]:
    providers, note = choose_providers(preference, ort["providers"])
    nvidia = providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    if nvidia and machine["os"] == "linux" and not machine["nvidia_driver"]:
        extra = f"{providers[0]} is compiled into this onnxruntime but no NVIDIA driver was found (sessions fall back to the CPU or fail)"
        note = f"{note}; {extra}" if note else extra
    return {"provider": providers[0], "providers": providers, "note": note}


# --- the human report -----------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    m, o = report["machine"], report["onnxruntime"]
    rows = [
        ("machine", f"{m['arch']}, {m['os']} ({m['platform']}), Python {m['python']}"),
        ("memory", _memory(m)),
        (
            "cpu",
            f"{m['cpu_logical']} logical, {m['cpu_physical'] or 'unknown'} physical cores"
            + (f", {m['cpu_usable']} usable by this process" if m["cpu_usable"] != m["cpu_logical"] else ""),
        ),
    ]
    if m["nvidia_driver"]:
        rows.append(("nvidia", m["nvidia_driver"]))
    if o["flavour"] == "none":
        rows.append(("onnxruntime", "not installed"))
    else:
        kind = {"training": "training build", "inference": "inference only", "broken": "does not import"}[o["flavour"]]
        rows.append(
            ("onnxruntime", f"{o['distribution'] or 'onnxruntime (no package metadata)'} {o['version']} ({kind})")
        )
        rows.append(("providers", ", ".join(o["providers"]) or "none"))
        if o["cuda_version"]:
            rows.append(("built for", f"CUDA {o['cuda_version']}"))
    rows.append(
        (
            "training",
            "possible here" if report["training_possible"] else "not possible here (no onnxruntime training build)",
        )
    )
    p = report["profile"]
    if p:
        rows.append(("", ""))
        rows.append(("profile", f"{p['name']} ({p['path']})" if p["path"] else p["name"]))
        rows.append(("wants", f"{p['arch']}, {'/'.join(p['os'])}, {p['ram_budget_mb']} MB, {p['threads']} threads"))
        if not p["training_supported"]:
            rows.append(("train with", "- (serve-only profile)"))
        elif report["train"]:
            rows.append(("train with", ", ".join(report["train"]["providers"])))
        else:
            rows.append(("train with", "- (no training build here)"))
        rows.append(
            ("serve with", ", ".join(report["serve"]["providers"]) if report["serve"] else "- (no onnxruntime here)")
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}".rstrip() for k, v in rows]
    if report["warnings"]:
        lines += ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _memory(m: dict) -> str:
    if m["ram_total_mb"] is None:
        return "unknown"
    text = f"{m['ram_total_mb']} MB total"
    if m["ram_available_mb"] is not None:
        text += f", {m['ram_available_mb']} MB available"
    if m["memory_limit_mb"] is not None:
        text += f", cgroup limit {m['memory_limit_mb']} MB"
    return text
