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
from edgeft.device.session import CPU, choose_providers
from edgeft.errors import EdgeftError
from edgeft.profiles import (
    DEVICES_DIR,
    Profile,
    arch_family,
    list_profiles,
    load_profile,
    runtime_settings,
)

PROFILES = sorted((ROOT / "devices").glob("*.toml"))
ARM64 = [p for p in PROFILES if arch_family(load_profile(p).arch) == "arm64"]
CUDA = "CUDAExecutionProvider"
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
    for providers in (p.providers.train, p.providers.serve):
        assert providers and providers[-1] == CPU  # every profile trains and serves, CPU closing the list
        assert all(name.endswith("ExecutionProvider") for name in providers)
    # Training runs on the CPU provider, or on CUDA where the profile installs onnxruntime-gpu.
    assert p.providers.train in ([CPU], [CUDA, CPU])
    assert (p.providers.train[0] == CUDA) == ("edgeft[device-gpu]" in p.install)
    # One environment trains and serves: a plain or vendor onnxruntime build, never the host's
    # training build, and never two builds of the `onnxruntime` module at once.
    assert p.install.startswith("pip install ") and "&&" not in p.install
    assert "onnxruntime-training" not in p.install
    vendor = [w for w in p.install.replace("'", " ").split() if "onnxruntime" in w]
    assert ("edgeft[device" in p.install) != bool(vendor), p.install


@pytest.mark.parametrize("path", ARM64, ids=lambda p: p.stem)
def test_arm64_profile_trains(path):
    """Plain onnxruntime >= 1.20 has aarch64/arm64 wheels and runs the training graphs: the
    aarch64 profiles (once serve-only) train, in the environment their install line sets up."""
    p = load_profile(path)
    assert p.providers.train and p.providers.train[-1] == CPU
    assert "onnxruntime-training" not in p.install and "uninstall" not in p.install
    settings = runtime_settings(p.name, "train")  # refused a training run before
    assert settings.provider in p.providers.train
    assert settings.memory_budget_mb == p.ram_budget_mb


def test_the_aarch64_profiles_are_there():
    assert {"raspberry-pi-5", "jetson-orin", "qualcomm-qnn", "apple-silicon"} <= {p.stem for p in ARM64}


def test_list_profiles_and_providers():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == {p.stem for p in PROFILES}
    for name in ("x86_64-cuda", "jetson-orin"):
        assert profiles[name].providers.train == profiles[name].providers.serve == [CUDA, CPU]
        assert profiles[name].install == "pip install 'edgeft[device-gpu]'"
    assert profiles["raspberry-pi-5"].providers.train == [CPU]
    assert profiles["raspberry-pi-5"].install == "pip install 'edgeft[device]'"
    assert profiles["intel-openvino"].install == "pip install edgeft 'onnxruntime-openvino>=1.20'"
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
    assert p.name == "bad" and p.ram_budget_mb == 1024 and p.providers.train == [CPU]


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
    "empty train providers": ("providers.train", [], "providers.train"),
    "train CPU not last": ("providers.train", [CPU, "CUDAExecutionProvider"], "providers.train"),
    "removed training flag": ("training_supported", False, "training_supported"),
    "removed training install": ("install_train", "pip install 'edgeft[device]'", "install_train"),
    "missing required key": ("install", _DELETE, "install"),
    "missing nested key": ("defaults.max_seq_len", _DELETE, "defaults.max_seq_len"),
    "bad quantization": ("defaults.quantization", "fp8", "defaults.quantization"),
    "unknown os": ("os", ["android"], "os"),
    "name not the file's": ("name", "other", "name"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_invalid_profile_names_file_and_field(tmp_path, case):
    dotted, new, field = INVALID[case]
    path = _write(tmp_path, _edit(_good(), dotted, new))
    with pytest.raises(EdgeftError) as err:
        load_profile(path)
    message = str(err.value)
    assert str(path) in message and field in message, message
    if "removed" in case:  # says what replaced it
        assert "no longer used" in message and "delete it" in message, message


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
    cuda, dml = CUDA, "DmlExecutionProvider"
    assert choose_providers([cuda, CPU], [cuda, CPU]) == ([cuda, CPU], None)
    assert choose_providers([CPU], [CPU]) == ([CPU], None)
    assert choose_providers([cuda], [cuda, CPU]) == ([cuda, CPU], None)  # CPU always closes the list
    chosen, message = choose_providers([cuda, CPU], ["AzureExecutionProvider", CPU])
    assert chosen == [CPU] and cuda in message and "using CPUExecutionProvider" in message
    chosen, message = choose_providers([cuda, dml, CPU], [dml, CPU])  # second choice is there
    assert chosen == [dml, CPU] and cuda in message and f"using {dml}" in message
    assert choose_providers([], [CPU]) == ([CPU], None)


def test_resolve_providers_goes_through_choose_providers(monkeypatch, capsys):
    """`--provider` resolution (session.py) and profiles share choose_providers; what it returns and
    says did not change."""
    from edgeft.device import session

    class Ort:
        available = [CPU]

        def get_available_providers(self):
            return list(self.available)

    monkeypatch.setattr(session, "onnxruntime", lambda: Ort())
    assert session.resolve_providers("cuda") == [CPU]
    assert capsys.readouterr().err == f"edgeft: provider cuda is not available here ({CPU}); using CPU\n"
    assert session.resolve_providers("cpu") == [CPU] and session.resolve_providers(None) == [CPU]
    Ort.available = [CUDA, CPU]
    assert session.resolve_providers("cuda") == [CUDA, CPU] == session.resolve_providers(None)
    assert session.resolve_providers(CPU) == [CPU] and capsys.readouterr().err == ""


# --- `edgeft devices` and the doctor -----------------------------------------------------------------


def _installed_ort() -> str | None:
    """The distribution that provides the onnxruntime module, found independently of the doctor."""
    for dist in importlib.metadata.distributions():
        top = (dist.read_text("top_level.txt") or "").split()
        files = [str(f) for f in (dist.files or [])]
        if "onnxruntime" in top or any(f.startswith("onnxruntime/__init__.py") for f in files):
            return dist.metadata["Name"]
    return None


def _trains(distribution: str, version: str) -> bool:
    """The rule, restated: a plain or vendor build >= 1.20, or the host's training build 1.19."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if distribution.startswith("onnxruntime-training"):
        return (major, minor) >= (1, 19)
    return (major, minor) >= (1, 20)


def test_devices_lists_profiles():
    result = CliRunner().invoke(main, ["devices"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["NAME", "ARCH", "OS", "TRAIN", "ON", "SERVE", "ON"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert set(rows) == {p.stem for p in PROFILES}
    assert rows["raspberry-pi-5"] == ["aarch64", "linux", "CPU", "CPU"]
    assert rows["jetson-orin"] == ["aarch64", "linux", "CUDA,", "CPU", "CUDA,", "CPU"]
    assert rows["qualcomm-qnn"] == ["arm64", "windows,linux", "CPU", "QNN,", "CPU"]
    assert rows["x86_64-cuda"][2:] == ["CUDA,", "CPU", "CUDA,", "CPU"]


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
    assert report["training_possible"] is _trains(o["distribution"], o["version"])
    assert f"{o['distribution']} {o['version']}" in report["training_note"]
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
    if CUDA not in available:
        assert "train with   CPUExecutionProvider\nserve with   CPUExecutionProvider" in result.output
        # Training and serving prefer CUDA alike: one warning says so, for both.
        assert "training and serving: CUDAExecutionProvider is not available here" in result.output
        assert result.output.count("CUDAExecutionProvider is not available here") == 1


def test_devices_check_unknown_profile_is_one_line():
    result = CliRunner().invoke(main, ["devices", "check", "--profile", "nope"])
    assert result.exit_code == 2
    assert result.output.startswith("error: unknown device profile 'nope'; available: ")


def test_doctor_warns_on_mismatch_and_memory(tmp_path):
    data = _good()
    data["ram_budget_mb"] = 10**9
    data["arch"] = "x86_64" if arch_family(platform.machine()) == "arm64" else "arm64"
    data["providers"] = {"train": [CUDA, CPU], "serve": [CPU]}
    report = doctor.check(load_profile(_write(tmp_path, data)))
    text = "\n".join(report["warnings"])
    assert f"plans for up to {10**9} MB" in text
    assert f"this machine is {platform.machine()}" in text
    assert "pip install" not in text  # no install advice for a machine the profile is not for
    assert report["serve"]["providers"][-1] == CPU


def _fake_ort(monkeypatch, distribution=None, version=None, providers=(CPU,), flavour=None, error=None, more=()):
    """Make the doctor see an onnxruntime that is not the one installed here."""
    if flavour is None:
        flavour = "none" if distribution is None else "training" if "training" in distribution else "inference"
    info = {
        "distribution": distribution,
        "distributions": [f"{distribution}=={version}", *more] if distribution else [],
        "flavour": "broken" if error else flavour,
        "version": version,
        "providers": [] if error or not distribution else list(providers),
        "cuda_version": None,
        "import_error": error,
    }
    monkeypatch.setattr(doctor, "_onnxruntime", lambda: dict(info))


def _on_x86_64_linux():
    if arch_family(platform.machine()) != "x86_64" or platform.system() != "Linux":
        pytest.skip("uses the advice of profiles for x86_64 Linux")


def test_doctor_without_onnxruntime(monkeypatch):
    _on_x86_64_linux()
    _fake_ort(monkeypatch)
    report = doctor.check(load_profile("x86_64-cpu"))
    assert report["training_possible"] is False and report["serve"] is None and report["train"] is None
    assert report["warnings"] == [
        "training and serving: onnxruntime is not installed; to train and serve here: pip install 'edgeft[device]'"
    ]
    text = doctor.render(report)
    assert "onnxruntime  not installed" in text
    assert "training     not possible here: onnxruntime is not installed" in text
    assert "train with   - (see training above)" in text


@pytest.mark.parametrize(
    ("distribution", "version", "possible", "note"),
    [
        ("onnxruntime", "1.32.0", True, "onnxruntime 1.32.0"),
        ("onnxruntime", "1.20.1", True, "onnxruntime 1.20.1"),
        ("onnxruntime", "1.18.1", False, "onnxruntime 1.18.1 is older than 1.20"),
        (
            "onnxruntime",
            "1.19.2",
            False,
            "onnxruntime 1.19.2 is older than 1.20",
        ),  # plain 1.19 is not the training build
        ("onnxruntime-openvino", "1.24.1", True, "onnxruntime-openvino 1.24.1"),
        ("onnxruntime-directml", "1.17.3", False, "onnxruntime-directml 1.17.3 is older than 1.20"),
        ("onnxruntime-gpu", "1.20.0", True, "onnxruntime-gpu 1.20.0"),
        ("onnxruntime-training-cpu", "1.19.2", True, "onnxruntime-training-cpu 1.19.2 (the host's training build)"),
        ("onnxruntime-training", "1.18.0", False, "onnxruntime-training 1.18.0 is older than 1.20"),
    ],
)
def test_training_possible_from_the_installed_onnxruntime(monkeypatch, distribution, version, possible, note):
    _fake_ort(monkeypatch, distribution, version)
    report = doctor.check()
    assert (report["training_possible"], report["training_note"]) == (possible, note)
    line = next(x for x in doctor.render(report).splitlines() if x.startswith("training "))
    assert line == f"training     {'possible here with' if possible else 'not possible here:'} {note}"
    assert (f"training and serving: {note}" in report["warnings"]) is not possible


def test_doctor_too_old_onnxruntime_gets_the_profile_line(monkeypatch):
    _on_x86_64_linux()
    _fake_ort(monkeypatch, "onnxruntime", "1.18.1")
    report = doctor.check(load_profile("raspberry-pi-5"))  # not this machine: no pip line
    assert "training and serving: onnxruntime 1.18.1 is older than 1.20" in report["warnings"]
    report = doctor.check(load_profile("x86_64-cpu"))
    assert report["train"] is None and report["serve"] is None
    assert (
        "training and serving: onnxruntime 1.18.1 is older than 1.20; to train and serve here: "
        "pip install 'edgeft[device]'" in report["warnings"]
    )


def test_doctor_broken_onnxruntime(monkeypatch):
    _on_x86_64_linux()
    _fake_ort(monkeypatch, "onnxruntime", "1.32.0", error="ImportError: libgomp.so.1: cannot open")
    report = doctor.check(load_profile("x86_64-cpu"))
    assert report["training_possible"] is False and report["training_note"] == "onnxruntime 1.32.0 does not import"
    assert report["warnings"] == [
        "onnxruntime is installed but does not import: ImportError: libgomp.so.1: cannot open; "
        "to train and serve here: pip uninstall -y onnxruntime && pip install 'edgeft[device]'"
    ]


def test_doctor_vendor_build_trains_on_cpu_and_serves_on_its_provider(monkeypatch):
    _on_x86_64_linux()
    openvino = "OpenVINOExecutionProvider"
    _fake_ort(monkeypatch, "onnxruntime-openvino", "1.24.1", providers=[openvino, CPU])
    report = doctor.check(load_profile("intel-openvino"))
    assert report["training_possible"] is True
    assert report["train"]["providers"] == [CPU] and report["serve"]["providers"] == [openvino, CPU]
    assert not [w for w in report["warnings"] if "not available" in w or "pip" in w]
    # Plain onnxruntime instead: training is fine, serving falls back; the way to OpenVINO replaces it.
    _fake_ort(monkeypatch, "onnxruntime", "1.32.0")
    report = doctor.check(load_profile("intel-openvino"))
    assert report["train"] == {"provider": CPU, "providers": [CPU], "note": None}
    assert [w for w in report["warnings"] if openvino in w] == [
        f"serving: {openvino} is not available here (this onnxruntime has: {CPU}); using {CPU}; "
        f"for {openvino}: pip uninstall -y onnxruntime && pip install edgeft 'onnxruntime-openvino>=1.20'"
    ]


def test_doctor_cuda_profile(monkeypatch):
    _on_x86_64_linux()
    _fake_ort(monkeypatch, "onnxruntime-gpu", "1.32.0", providers=[CUDA, CPU])
    report = doctor.check(load_profile("x86_64-cuda"))
    assert report["train"]["providers"] == report["serve"]["providers"] == [CUDA, CPU]
    # Plain onnxruntime: one warning for both roles, and the gpu build in its place.
    _fake_ort(monkeypatch, "onnxruntime", "1.32.0")
    report = doctor.check(load_profile("x86_64-cuda"))
    assert [w for w in report["warnings"] if CUDA in w] == [
        f"training and serving: {CUDA} is not available here (this onnxruntime has: {CPU}); using {CPU}; "
        f"for {CUDA}: pip uninstall -y onnxruntime && pip install 'edgeft[device-gpu]'"
    ]
    # The host's environment: the advice is a separate environment, not removing its training build.
    _fake_ort(monkeypatch, "onnxruntime-training-cpu", "1.19.2")
    report = doctor.check(load_profile("x86_64-cuda"))
    assert report["train"]["providers"] == [CPU]
    assert [w for w in report["warnings"] if CUDA in w][0].endswith(
        f"; for {CUDA}: in a separate environment (this one has the host's onnxruntime-training-cpu): "
        "pip install 'edgeft[device-gpu]'"
    )


def test_doctor_several_builds(monkeypatch):
    _on_x86_64_linux()
    _fake_ort(monkeypatch, "onnxruntime", "1.32.0", more=["onnxruntime-openvino==1.24.1"])
    report = doctor.check(load_profile("intel-openvino"))
    assert report["warnings"][0].startswith(
        "several packages provide the onnxruntime module (onnxruntime==1.32.0, onnxruntime-openvino==1.24.1)"
    )
    # The OpenVINO line keeps its own build and removes the plain one.
    assert any(
        w.endswith("pip uninstall -y onnxruntime && pip install edgeft 'onnxruntime-openvino>=1.20'")
        for w in report["warnings"]
    )


# --- the torch-free environments ----------------------------------------------------------------------

PROBE = """
import json, sys
from edgeft.device.doctor import check
from edgeft.profiles import load_profile
report = check(load_profile("raspberry-pi-5"))
print(json.dumps({
    "training_possible": report["training_possible"],
    "distribution": report["onnxruntime"]["distribution"],
    "version": report["onnxruntime"]["version"],
    "train": report["train"]["providers"],
    "serve": report["serve"]["providers"],
    "torch": "torch" in sys.modules,
}))
"""

VENVS = {  # both are plain onnxruntime, which trains: the newest release and the oldest supported one
    "EDGEFT_DEVICE_VENV": lambda version: _trains("onnxruntime", version),
    "EDGEFT_OLD_DEVICE_VENV": lambda version: version.startswith("1.20."),
}


@pytest.mark.parametrize("variable", VENVS)
def test_check_in_torch_free_venv(variable):
    venv = os.environ.get(variable)
    if not venv:
        pytest.skip(f"{variable} not set (make test sets it)")
    bin_dir = Path(venv) / "bin"
    probe = subprocess.run([str(bin_dir / "python"), "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout.strip().splitlines()[-1])
    version = got.pop("version")
    assert VENVS[variable](version), version
    assert got == {
        "training_possible": True,
        "distribution": "onnxruntime",
        "train": [CPU],
        "serve": [CPU],
        "torch": False,
    }
    cli = subprocess.run(
        [str(bin_dir / "edgeft"), "devices", "check", "--profile", "raspberry-pi-5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert f"training     possible here with onnxruntime {version}\n" in cli.stdout
    assert "train with   CPUExecutionProvider\nserve with   CPUExecutionProvider" in cli.stdout
