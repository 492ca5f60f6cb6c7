"""``edgeft devices check``: what this machine is, which ONNX Runtime it has, what a profile gets here.

Reads only what is cheap and safe: platform, /proc and /sys on Linux, package metadata, and the
``onnxruntime`` module itself (never its training submodule). Note that the host's training build's
own ``import onnxruntime`` tries its ortmodule, which loads torch wherever torch happens to be
installed.

Training is possible where ``onnxruntime`` imports and is a plain or vendor build (any distribution
but ``onnxruntime-training*``) of version 1.20 or later, or the host's ``onnxruntime-training*`` 1.19
build: all of them run the bundle's training graphs, so one environment trains and serves. Serving
needs the same, so the report says ``training_possible`` once for both.
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
_MIN_ORT = (1, 20)  # setup.cfg's device extras: plain onnxruntime and its vendor builds
_TRAINING_BUILD = (1, 19)  # the host extra's onnxruntime-training-cpu, which runs the same graphs


def check(profile: Profile | None = None) -> dict[str, Any]:
    """A JSON-ready report on this machine and, given a profile, what that profile gets here."""
    machine = _machine()
    ort = _onnxruntime()
    possible, why = _training(ort)
    report: dict[str, Any] = {
        "machine": machine,
        "onnxruntime": ort,
        "training_possible": possible,
        "training_note": why,  # the onnxruntime that trains, or why none does
        "profile": None,
        "train": None,
        "serve": None,
        "warnings": _general_warnings(machine, ort, possible, why),
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
    info["flavour"] = "training" if _is_training_build(info["distribution"]) else "inference"
    return info


def _is_training_build(distribution: str | None) -> bool:
    return (distribution or "").lower().replace("_", "-").startswith("onnxruntime-training")


def _training(ort: dict) -> tuple[bool, str]:
    """Whether this onnxruntime trains (and serves) edgeft's graphs, and the build or the reason why not."""
    if ort["flavour"] == "none":
        return False, "onnxruntime is not installed"
    name = ort["distribution"] or "onnxruntime"
    if ort["flavour"] == "broken":
        return False, f"{name} {ort['version']} does not import" if ort["version"] else f"{name} does not import"
    version = _version(ort["version"] or "")
    if ort["flavour"] == "training" and version[:2] == _TRAINING_BUILD:
        return True, f"{name} {ort['version']} (the host's training build)"
    if version < _MIN_ORT:
        return False, f"{name} {ort['version']} is older than {'.'.join(map(str, _MIN_ORT))}"
    return True, f"{name} {ort['version']}"


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


def _general_warnings(machine: dict, ort: dict, possible: bool, why: str) -> list[str]:
    warnings = []
    if len(ort["distributions"]) > 1:
        warnings.append(
            f"several packages provide the onnxruntime module ({', '.join(ort['distributions'])}); they overwrite "
            "each other's files: uninstall all of them and install one"
        )
    runtime = _runtime_warning(ort, possible, why)
    if runtime:
        warnings.append(runtime)
    limit, total = machine["memory_limit_mb"], machine["ram_total_mb"]
    if limit is not None and total is not None and limit < total:
        warnings.append(f"this process is limited to {limit} MB by its cgroup (the machine has {total} MB)")
    return warnings


def _runtime_warning(ort: dict, possible: bool, why: str) -> str | None:
    """Why this onnxruntime runs nothing of edgeft's (a profile adds its pip line to it)."""
    if ort["import_error"]:
        return f"onnxruntime is installed but does not import: {ort['import_error']}"
    return None if possible else f"training and serving: {why}"


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a version string; () when it has none."""
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


# --- with a profile ---------------------------------------------------------------------------------


def _with_profile(report: dict, profile: Profile) -> None:
    machine, ort, warnings = report["machine"], report["onnxruntime"], report["warnings"]
    report["profile"] = {
        "name": profile.name,
        "path": str(profile.path) if profile.path else None,
        "arch": profile.arch,
        "os": profile.os,
        "install": profile.install,
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

    # The profile's pip line, for a machine the profile is meant for only.
    hint = _install_hint(profile.install, ort) if matches else None
    if hint and ort["flavour"] == "training":  # the host's environment: keep its training build
        hint = f"in a separate environment (this one has the host's {ort['distribution']}): {profile.install}"
    if not report["training_possible"]:
        runtime = _runtime_warning(ort, False, report["training_note"])
        if hint and runtime in warnings:
            warnings[warnings.index(runtime)] = f"{runtime}; to train and serve here: {hint}"
        return
    report["train"] = _uses(profile.providers.train, ort, machine)
    report["serve"] = _uses(profile.providers.serve, ort, machine)
    notes: dict[str, list[str]] = {}  # one warning for a note that training and serving share
    for role in ("train", "serve"):
        if report[role]["note"]:
            notes.setdefault(report[role]["note"], []).append({"train": "training", "serve": "serving"}[role])
    for note, roles in notes.items():
        wanted = (profile.providers.train if roles[0] == "training" else profile.providers.serve)[0]
        warnings.append(f"{' and '.join(roles)}: {note}" + (f"; for {wanted}: {hint}" if hint else ""))


def _install_hint(line: str, ort: dict) -> str:
    """``line``, preceded by uninstalling the onnxruntime distributions it does not install itself
    (every build provides the same module, so two of them overwrite each other's files) and, when
    the installed one does not import, that one too."""
    kept = {"onnxruntime-gpu"} if "[device-gpu]" in line else {"onnxruntime"} if "[device]" in line else set()
    kept |= {_normal(name) for name in re.findall(r"\b(onnxruntime[-\w.]*\w)", line)}
    installed = [d.split("==")[0] for d in ort["distributions"]]
    stale = [name for name in installed if ort["import_error"] or _normal(name) not in kept]
    return f"pip uninstall -y {' '.join(stale)} && {line}" if stale else line


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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
        kind = {"training": " (training build)", "inference": "", "broken": " (does not import)"}[o["flavour"]]
        rows.append(("onnxruntime", f"{o['distribution'] or 'onnxruntime (no package metadata)'} {o['version']}{kind}"))
        rows.append(("providers", ", ".join(o["providers"]) or "none"))
        if o["cuda_version"]:
            rows.append(("built for", f"CUDA {o['cuda_version']}"))
    possible = report["training_possible"]
    rows.append(("training", f"{'possible here with' if possible else 'not possible here:'} {report['training_note']}"))
    p = report["profile"]
    if p:
        rows.append(("", ""))
        rows.append(("profile", f"{p['name']} ({p['path']})" if p["path"] else p["name"]))
        rows.append(("wants", f"{p['arch']}, {'/'.join(p['os'])}, {p['ram_budget_mb']} MB, {p['threads']} threads"))
        for role in ("train", "serve"):
            uses = report[role]
            rows.append((f"{role} with", ", ".join(uses["providers"]) if uses else "- (see training above)"))
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
