"""Device profiles (devices/*.toml), their strict loader, provider choice and `edgeft devices`."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from edgeft.cli import main
from edgeft.device import doctor
from edgeft.errors import EdgeftError
from edgeft.profiles import (
    CPU,
    DEVICES_DIR,
    Profile,
    arch_family,
    choose_providers,
    list_profiles,
    load_profile,
)

PROFILES = sorted((ROOT / "devices").glob("*.toml"))
REQUIRED = {
    "x86_64-cpu",
    "x86_64-cuda",
    "raspberry-pi-5",
    "jetson-orin",
    "intel-openvino",
    "qualcomm-qnn",
    "apple-silicon",
    "windows-directml",
    "amd-vitis-ai",
}


# --- the shipped profiles ---------------------------------------------------------------------------


def test_profiles_dir_is_the_repository_one():
    assert DEVICES_DIR == ROOT / "devices"
    assert {p.stem for p in PROFILES} >= REQUIRED


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_profile_loads_and_is_consistent(path):
    p = load_profile(path.stem)
    assert isinstance(p, Profile) and p.name == path.stem and p.path == path
    assert load_profile(path) == p  # by path too
    assert p.providers.serve and p.providers.serve[-1] == CPU
    for providers in (p.providers.train, p.providers.serve):
        assert all(name.endswith("ExecutionProvider") for name in providers)
    if p.training_supported:
        assert p.providers.train and p.providers.train[-1] == CPU
        assert "edgeft[device]" in p.train_install
    else:
        assert p.notes and "serve" in p.notes.lower()
    # No onnxruntime-training wheels exist for Linux aarch64 or Windows arm64.
    if arch_family(p.arch) == "arm64" and p.os != ["macos"]:
        assert not p.training_supported
    assert p.install.startswith("pip install")


def test_list_profiles_and_providers():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == {p.stem for p in PROFILES}
    assert profiles["x86_64-cuda"].providers.train[0] == "CUDAExecutionProvider"
    assert profiles["jetson-orin"].providers.serve[0] == "CUDAExecutionProvider"
    assert not profiles["jetson-orin"].training_supported and not profiles["raspberry-pi-5"].training_supported
    assert profiles["intel-openvino"].providers.serve[0] == "OpenVINOExecutionProvider"
    assert profiles["qualcomm-qnn"].providers.serve[0] == "QNNExecutionProvider"
    assert profiles["apple-silicon"].providers.serve[0] == "CoreMLExecutionProvider"
    assert profiles["windows-directml"].providers.serve[0] == "DmlExecutionProvider"
    assert profiles["amd-vitis-ai"].providers.serve[0] == "VitisAIExecutionProvider"


# --- strict validation --------------------------------------------------------------------------------


def _toml(data: dict) -> str:
    """A tiny TOML writer for the flat-plus-tables shape of a profile."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def _good() -> dict:
    return {
        "name": "bad",
        "description": "a test device",
        "arch": "x86_64",
        "os": ["linux"],
        "ram_budget_mb": 1024,
        "threads": 0,
        "training_supported": True,
        "install": "pip install 'edgeft[device]'",
        "providers": {"train": [CPU], "serve": [CPU]},
        "defaults": {"max_seq_len": 128, "quantization": "none"},
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(_toml(data))
    return path


def test_a_valid_custom_profile_loads(tmp_path):
    p = load_profile(_write(tmp_path, _good()))
    assert p.name == "bad" and p.ram_budget_mb == 1024 and p.install_train is None


def test_export_takes_length_and_quantization_from_the_profile(factory, tmp_path):
    """`export --profile`: defaults.max_seq_len and defaults.quantization apply unless the options
    say otherwise (`--quantize none` gives an fp32 base on an int8 profile)."""
    data = _good()
    data["defaults"] = {"max_seq_len": 64, "quantization": "int8"}
    profile = _write(tmp_path, data)
    model = factory.model("llama")
    for extra, scheme, length in (([], "int8", 64), (["--quantize", "none", "--max-seq-len", "96"], None, 96)):
        out = tmp_path / f"bundle-{length}"
        result = CliRunner().invoke(main, ["export", str(model), "--out", str(out), "--profile", str(profile), *extra])
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest.get("quantization", {}).get("scheme") == scheme
        assert manifest["max_seq_len"] == length


def _edit(data: dict, dotted: str, new) -> dict:
    *parents, key = dotted.split(".")
    table = data
    for part in parents:
        table = table[part]
    if new is _DELETE:
        del table[key]
    else:
        table[key] = new
    return data


_DELETE = object()
INVALID = {
    "unknown key": ("colour", "blue", "colour"),
    "unknown nested key": ("providers.bogus", [CPU], "bogus"),
    "bad arch": ("arch", "riscv64", "arch"),
    "negative RAM": ("ram_budget_mb", -1, "ram_budget_mb"),
    "zero RAM": ("ram_budget_mb", 0, "ram_budget_mb"),
    "RAM as text": ("ram_budget_mb", "4096", "ram_budget_mb"),
    "RAM as bool": ("ram_budget_mb", True, "ram_budget_mb"),
    "negative threads": ("threads", -2, "threads"),
    "bad provider name": ("providers.serve", ["CUDA", CPU], "providers.serve"),
    "CPU not last": ("providers.serve", [CPU, "CUDAExecutionProvider"], "providers.serve"),
    "empty serve providers": ("providers.serve", [], "providers.serve"),
    "training without providers": ("providers.train", [], "providers.train"),
    "training flag not bool": ("training_supported", "yes", "training_supported"),
    "missing required key": ("install", _DELETE, "install"),
    "missing nested key": ("defaults.max_seq_len", _DELETE, "defaults.max_seq_len"),
    "bad quantization": ("defaults.quantization", "fp8", "defaults.quantization"),
    "unknown os": ("os", ["android"], "os"),
    "name not the file's": ("name", "other", "name"),
    "serve-only without notes": ("training_supported", False, "notes"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_profile_names_file_and_field(tmp_path, case):
    dotted, new, field = INVALID[case]
    path = _write(tmp_path, _edit(_good(), dotted, new))
    with pytest.raises(EdgeftError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and field in message, message


def test_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(EdgeftError, match="not valid TOML") as err:
        load_profile(path)
    assert str(path) in str(err.value)


def test_unknown_profile_lists_available():
    with pytest.raises(EdgeftError) as err:
        load_profile("no-such-device")
    message = str(err.value)
    assert "no-such-device" in message and all(name in message for name in REQUIRED)


def test_missing_profile_file(tmp_path):
    with pytest.raises(EdgeftError, match="no such device profile file"):
        load_profile(tmp_path / "absent.toml")


# --- provider choice -------------------------------------------------------------------------------


def test_choose_providers():
    cuda, dml = "CUDAExecutionProvider", "DmlExecutionProvider"
    assert choose_providers([cuda, CPU], [cuda, CPU]) == ([cuda, CPU], None)
    assert choose_providers([CPU], [CPU]) == ([CPU], None)
    assert choose_providers([cuda], [cuda, CPU]) == ([cuda, CPU], None)  # CPU always closes the list
    chosen, message = choose_providers([cuda, CPU], ["AzureExecutionProvider", CPU])
    assert chosen == [CPU] and cuda in message and "using CPUExecutionProvider" in message
    chosen, message = choose_providers([cuda, dml, CPU], [dml, CPU])  # second choice is there
    assert chosen == [dml, CPU] and cuda in message and f"using {dml}" in message
    assert choose_providers([], [CPU]) == ([CPU], None)


# --- `edgeft devices` and the doctor -----------------------------------------------------------------


def _installed_ort() -> str | None:
    """The distribution that provides the onnxruntime module, found independently of the doctor."""
    for dist in importlib.metadata.distributions():
        top = (dist.read_text("top_level.txt") or "").split()
        files = [str(f) for f in (dist.files or [])]
        if "onnxruntime" in top or any(f.startswith("onnxruntime/__init__.py") for f in files):
            return dist.metadata["Name"]
    return None


def test_devices_lists_profiles():
    result = CliRunner().invoke(main, ["devices"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ARCH", "OS", "TRAIN"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {p.stem for p in PROFILES}
    assert rows["raspberry-pi-5"][1:4] == ["aarch64", "linux", "no"]
    assert rows["x86_64-cuda"][3] == "yes" and "CUDA," in rows["x86_64-cuda"]


def test_devices_check_json_matches_this_machine():
    result = CliRunner().invoke(main, ["devices", "check", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    m, o = report["machine"], report["onnxruntime"]
    assert m["arch"] == platform.machine()
    assert m["cpu_logical"] == os.cpu_count()
    assert o["distribution"] == _installed_ort()
    assert o["version"] == importlib.metadata.version(o["distribution"])
    assert o["flavour"] == ("training" if "training" in o["distribution"] else "inference")
    assert report["training_possible"] == (importlib.util.find_spec("onnxruntime.training") is not None)
    assert CPU in o["providers"]
    if Path("/proc/meminfo").exists():
        total_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        assert m["ram_total_mb"] == total_kb // 1024
    assert report["profile"] is None and report["train"] is None and report["serve"] is None


def test_devices_check_with_profile():
    result = CliRunner().invoke(main, ["devices", "check", "--profile", "x86_64-cuda"])
    assert result.exit_code == 0, result.output
    import onnxruntime

    available = onnxruntime.get_available_providers()
    assert "profile      x86_64-cuda" in result.output
    if "CUDAExecutionProvider" not in available:
        assert "serve with   CPUExecutionProvider" in result.output
        assert "CUDAExecutionProvider is not available here" in result.output


def test_devices_check_unknown_profile_is_one_line():
    result = CliRunner().invoke(main, ["devices", "check", "--profile", "nope"])
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown device profile 'nope'; available: ")


def test_doctor_warns_on_mismatch_and_memory(tmp_path):
    data = _good()
    data["ram_budget_mb"] = 10**9
    data["arch"] = "x86_64" if arch_family(platform.machine()) == "arm64" else "arm64"
    report = doctor.check(load_profile(_write(tmp_path, data)))
    text = "\n".join(report["warnings"])
    assert f"plans for up to {10**9} MB" in text
    assert f"this machine is {platform.machine()}" in text
    assert "pip install" not in text  # no install advice for a machine the profile is not for
    assert report["serve"]["providers"][-1] == CPU


def test_doctor_without_onnxruntime(monkeypatch):
    if arch_family(platform.machine()) != "x86_64" or platform.system() != "Linux":
        pytest.skip("uses the x86_64 Linux profile's advice")
    none = {
        "distribution": None,
        "distributions": [],
        "flavour": "none",
        "version": None,
        "providers": [],
        "cuda_version": None,
        "training_api": False,
        "import_error": None,
    }
    monkeypatch.setattr(doctor, "_onnxruntime", lambda: dict(none))
    report = doctor.check(load_profile("x86_64-cpu"))
    assert report["training_possible"] is False and report["serve"] is None and report["train"] is None
    assert report["warnings"] == [
        "training: onnxruntime is not installed; to train here: pip install 'edgeft[device]'",
        "serving: onnxruntime is not installed; to serve here: pip install 'edgeft[device]'",
    ]
    assert "onnxruntime  not installed" in doctor.render(report)


# --- the torch-free environments ----------------------------------------------------------------------

PROBE = """
import json, sys
from edgeft.device.doctor import check
from edgeft.profiles import load_profile
report = check(load_profile("x86_64-cpu"))
print(json.dumps({
    "training_possible": report["training_possible"],
    "distribution": report["onnxruntime"]["distribution"],
    "serve": report["serve"]["providers"],
    "torch": "torch" in sys.modules,
}))
"""

VENVS = {
    "device": (os.environ.get("EDGEFT_DEVICE_VENV"), True, "onnxruntime-training-cpu"),
    "serve": (os.environ.get("EDGEFT_SERVE_VENV"), False, "onnxruntime"),
}


@pytest.mark.parametrize("kind", VENVS)
def test_check_in_torch_free_venv(kind):
    venv, trains, distribution = VENVS[kind]
    if not venv:
        pytest.skip(f"EDGEFT_{kind.upper()}_VENV not set (make test sets it)")
    bin_dir = Path(venv) / "bin"
    probe = subprocess.run([str(bin_dir / "python"), "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    assert got == {"training_possible": trains, "distribution": distribution, "serve": [CPU], "torch": False}
    cli = subprocess.run([str(bin_dir / "edgeft"), "devices", "check"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert ("training     possible here" in cli.stdout) is trains
