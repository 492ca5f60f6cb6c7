"""Crash safety of ``edgeft train``: a device's adapter is never lost or corrupted.

``edgeft train`` runs as a real subprocess that is SIGKILLed at random moments (start-up, training
steps, inside checkpoint writes) and restarted with ``--resume`` until it finishes; the disk fills
up in the middle of a checkpoint write (injected ENOSPC everywhere, a real small tmpfs where it can be
mounted) and while the trained adapter is written. After every kill and every failure the
run directory must hold only complete checkpoints, and the finished run must equal an
uninterrupted one. Measured: the result is bit-exact (deterministic ONNX Runtime + numpy AdamW),
so the test asserts bit-exact equality.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

STEPS = 40
KILLS = 24
SEED = 1234
KEEP = 2  # edgeft.device.train.KEEP_CHECKPOINTS
SLOW_WRITE_S = 0.05  # EDGEFT_TEST_SLOW_CHECKPOINT: pause between the stages of a checkpoint write
PAGE = os.sysconf("SC_PAGE_SIZE")
CHECKPOINT_FILES = {"lora.safetensors", "optimizer.safetensors", "state.json"}

# `python -m edgeft.cli`, as a device runs it: without torch. onnxruntime's training build imports
# torch whenever it is installed (3 s per start in the host venv), too slow for dozens of restarts.
LAUNCH = 'import runpy, sys; sys.modules["torch"] = None; runpy.run_module("edgeft.cli", run_name="__main__")'


@dataclass
class Reference:
    """An uninterrupted run with the same settings."""

    adapter: dict[str, np.ndarray]
    losses: list[float]
    wall_s: float
    checkpoint_bytes: int  # disk pages one checkpoint takes


def _argv(bundle: Path, run: Path, *extra: str) -> list[str]:
    data = str(DATA / "train.jsonl")
    opts = ["--max-steps", str(STEPS), "--save-every", "1", "--lr", "5e-3", "--seed", "3"]
    return [sys.executable, "-c", LAUNCH, "train", str(bundle), "--data", data, "--out", str(run), *opts, *extra]


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _pages(directory: Path) -> int:
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in directory.iterdir())


@pytest.fixture(scope="module")
def reference(llama_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    run = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.monotonic()
    done = subprocess.run(_argv(llama_bundle, run, "--no-progress"), capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    losses = json.loads((run / "summary.json").read_text())["losses"]
    newest = sorted((run / "checkpoints").iterdir())[-1]
    return Reference(_load(run / "adapter" / "adapter_model.safetensors"), losses, wall, _pages(newest))


def _assert_same_adapter(run: Path, ref: Reference) -> None:
    got = _load(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == ref.adapter.keys()
    worst = max(float(np.max(np.abs(got[k] - ref.adapter[k]))) for k in got)
    assert all(np.array_equal(got[k], ref.adapter[k]) for k in got), f"not bit-exact: max abs diff {worst}"


def _assert_consistent(run: Path, ref: Reference) -> int:
    """Everything visible in ``run`` is complete and loadable; returns the newest checkpoint's step."""
    steps = []
    root = run / "checkpoints"
    for ckpt in sorted(root.iterdir()) if root.is_dir() else []:
        if ckpt.name.startswith("."):
            continue  # staging: invisible to --resume by design
        assert re.fullmatch(r"step-\d{8}", ckpt.name), ckpt
        assert {f.name for f in ckpt.iterdir()} == CHECKPOINT_FILES, f"{ckpt} is incomplete"
        state = json.loads((ckpt / "state.json").read_text())
        step = int(ckpt.name.removeprefix("step-"))
        assert state["step"] == step and state["losses"] == ref.losses[:step], ckpt
        assert len(_load(ckpt / "lora.safetensors")) == len(ref.adapter), ckpt  # ONNX names here, PEFT there
        assert _load(ckpt / "optimizer.safetensors"), ckpt
        steps.append(step)
    assert len(steps) <= KEEP + 1, steps  # KEEP, plus a new one whose older sibling is being pruned
    if (run / "adapter").exists():  # only written at the very end: must be whole and final
        json.loads((run / "adapter" / "adapter_config.json").read_text())
        _assert_same_adapter(run, ref)
    if (run / "summary.json").exists():
        assert json.loads((run / "summary.json").read_text())["losses"] == ref.losses
    return max(steps, default=0)


def _assert_finished(run: Path, ref: Reference) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["losses"] == ref.losses  # nothing redone from step 0
    _assert_same_adapter(run, ref)
    stale = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not stale, f"staging dirs left behind: {stale}"


# --- SIGKILL at random moments ------------------------------------------------------------------


# The stages of a checkpoint write where edgeft.device.train pauses under EDGEFT_TEST_SLOW_CHECKPOINT,
# in order. With EDGEFT_TEST_CHECKPOINT_MARKS=FILE the child appends each stage it reaches to FILE,
# between "begin" and "done": the test kills inside a stage on purpose, and the last mark says where
# each kill really landed.
STAGES = ["after-lora", "after-optimizer", "after-state", "before-prune"]


def _marks(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _landed(marks: list[str]) -> str:
    """The checkpoint-write stage a kill interrupted ("begin" included), or "outside" a write."""
    return marks[-1] if marks and marks[-1] != "done" else "outside"


def _wait_and_kill(proc: subprocess.Popen, mode: str, rng: random.Random, ref: Reference, marks: Path) -> None:
    nth = rng.randint(1, 3) if mode in STAGES else 0  # in the nth checkpoint this launch writes
    if mode == "start-up":
        deadline = time.monotonic() + rng.uniform(0.0, 0.45 * ref.wall_s)
    elif mode == "anytime":
        deadline = time.monotonic() + rng.uniform(0.3 * ref.wall_s, ref.wall_s)
    else:
        deadline = time.monotonic() + 30  # the stage comes long before
    while proc.poll() is None and time.monotonic() < deadline:
        if mode in STAGES and _marks(marks).count(mode) >= nth:
            time.sleep(rng.uniform(0.0, 0.6 * SLOW_WRITE_S))  # somewhere inside this stage's pause
            break
        time.sleep(0.002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _start_step(stderr: str) -> int | None:
    """The step the launch started from: tqdm's first bar shows it (``10/40 [``)."""
    m = re.search(r"(\d+)/\d+ \[", stderr)
    return int(m.group(1)) if m else None


def test_sigkill_at_random_moments_never_loses_or_corrupts(
    llama_bundle: Path, reference: Reference, tmp_path: Path
) -> None:
    """>= KILLS SIGKILLs spread over start-up, training steps and checkpoint writes; each restart
    resumes from the newest complete checkpoint; every finished run equals the uninterrupted one.
    Where each kill landed is what the child recorded, not what the test aimed at: at least half
    of them inside a checkpoint write, in each of its paused stages."""
    rng = random.Random(SEED)
    # Every kind of moment in a shuffled, repeating order: each gets several kills whatever the timing.
    modes = rng.sample(["start-up", "anytime", *STAGES] * 4, k=4 * (2 + len(STAGES)))
    kills: Counter[str] = Counter()  # by the moment aimed at
    landed: Counter[str] = Counter()  # by the stage the child's marks show it was in
    finished, resumed_mid_run, launches = 0, 0, 0
    run, newest, resume = tmp_path / "run-0", 0, False
    while sum(kills.values()) < KILLS or resume:
        launches += 1
        assert launches < 4 * KILLS, "runs do not progress"
        # Once enough kills landed, the current run finishes without one.
        mode = modes[launches % len(modes)] if sum(kills.values()) < KILLS else "never"
        marks = tmp_path / f"marks-{launches}.txt"
        env = {**os.environ, "EDGEFT_TEST_CHECKPOINT_MARKS": str(marks)}
        if mode in STAGES:
            env["EDGEFT_TEST_SLOW_CHECKPOINT"] = str(SLOW_WRITE_S)
        log = tmp_path / f"stderr-{launches}.txt"
        with open(log, "w") as err:  # progress bar on: its first frame shows the step resumed at
            argv = _argv(llama_bundle, run, *(["--resume"] if resume else []))
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)
            if mode == "never":
                proc.wait(timeout=120)
            else:
                _wait_and_kill(proc, mode, rng, reference, marks)
        stderr = log.read_text()
        started = _start_step(stderr)
        assert started is None or started == newest, f"resumed at {started}, newest checkpoint {newest}"
        resumed_mid_run += bool(started)
        if proc.returncode == 0:
            _assert_finished(run, reference)
            finished += 1
            run, newest, resume = tmp_path / f"run-{finished}", 0, False
            continue
        assert proc.returncode == -signal.SIGKILL, stderr
        kills[mode] += 1
        landed[_landed(_marks(marks))] += 1
        newest_now = _assert_consistent(run, reference)
        assert newest_now >= newest, "a complete checkpoint disappeared"
        newest, resume = newest_now, True
    assert finished >= 1 and resumed_mid_run >= KILLS // 3, (finished, resumed_mid_run)
    assert all(kills[m] >= 1 for m in ["start-up", "anytime", *STAGES]), kills
    print(f"SIGKILLs by where they landed: {dict(landed)}")
    inside = sum(n for where, n in landed.items() if where != "outside")
    assert inside >= KILLS // 2 and all(landed[stage] >= 1 for stage in STAGES), landed


# --- full disk ------------------------------------------------------------------------------------
#
# Two ways to fill the disk, one test body. "injected" runs everywhere, without mount rights:
# EDGEFT_TEST_DISK_BYTES gives the child a byte budget at edgeft's write layer (edgeft/fsutil.py),
# every file edgeft's training writes goes through it, and the write that crosses it writes what
# fits and raises OSError(ENOSPC) as the kernel's write does (test_injected_full_disk_is_the_kernels
# compares the two on /dev/full). "tmpfs" is a real 8 MiB tmpfs, where this test may mount one.


class _InjectedDisk:
    kind = "injected"

    def __init__(self, root: Path):
        self.root, self.env = root, dict(os.environ)

    def fill(self, leave: int) -> None:
        self.env["EDGEFT_TEST_DISK_BYTES"] = str(leave)

    def free(self) -> None:
        del self.env["EDGEFT_TEST_DISK_BYTES"]


class _Tmpfs:
    kind = "tmpfs"

    def __init__(self, root: Path):
        self.root, self.env = root, dict(os.environ)
        self.filler = root / "filler"

    def fill(self, leave: int) -> None:
        """Fill the tmpfs but ``leave`` bytes with a file that ``free`` deletes."""
        st = os.statvfs(self.root)
        with open(self.filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - leave))

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture(params=["injected", "tmpfs"])
def small_disk(request, tmp_path: Path) -> Iterator[_InjectedDisk | _Tmpfs]:
    """The injected budget, always; a fresh 8 MiB tmpfs (unmounted afterwards) where mount(8) may
    mount one (root or CAP_SYS_ADMIN), skipped elsewhere: the injected case covers the claim."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if request.param == "injected":
        yield _InjectedDisk(mnt)
        return
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux mount(8) to make a small tmpfs that fills up")
    cmd = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)]
    mounted = subprocess.run(cmd, capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield _Tmpfs(mnt)
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_injected_full_disk_is_the_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """edgeft's writer on a real full device (/dev/full: every write fails with ENOSPC) and under the
    injected budget raise the same error, and both count as a full disk."""
    from edgeft import fsutil

    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "Linux's /dev/full is missing"
    data = b"x" * (1 << 20)  # far above io's buffer: the write itself fails, not a later flush
    with pytest.raises(OSError) as real:
        fsutil.write_bytes("/dev/full", data)
    monkeypatch.setenv("EDGEFT_TEST_DISK_BYTES", "1000")
    monkeypatch.setattr(fsutil, "_test_bytes_written", 0)
    with pytest.raises(OSError) as injected:
        fsutil.write_bytes(tmp_path / "file", data)
    assert type(injected.value) is type(real.value)
    assert (injected.value.errno, injected.value.strerror) == (real.value.errno, real.value.strerror)
    assert real.value.errno == errno.ENOSPC and fsutil.is_disk_full(real.value) and fsutil.is_disk_full(injected.value)
    assert (tmp_path / "file").read_bytes() == data[:1000]  # what fitted was written, as on a disk
    with pytest.raises(OSError, match="No space left"):
        fsutil.atomic_write_bytes(tmp_path / "other", b"y")  # the budget is spent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # its temp file was removed


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "no space left on device" in lines[0]
    return lines[0]


def test_full_disk_during_checkpoint_keeps_previous_one_and_resumes(
    llama_bundle: Path, reference: Reference, small_disk: _InjectedDisk | _Tmpfs
) -> None:
    disk = small_disk
    run = disk.root / "run"
    disk.fill(leave=int(1.5 * reference.checkpoint_bytes))  # ~1.5 checkpoints fit
    argv = _argv(llama_bundle, run, "--no-progress")
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=disk.env)
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    assert f"{run / 'checkpoints'}: " in line
    step = int(re.search(r"writing checkpoint step (\d+);", line).group(1))
    assert step >= 2, line  # at least one checkpoint was complete before the disk filled
    previous = run / "checkpoints" / f"step-{step - 1:08d}"
    assert f"previous checkpoint {previous} is intact" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == previous.name
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "staging left behind"
    assert _assert_consistent(run, reference) == step - 1
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()

    disk.free()
    argv = _argv(llama_bundle, run, "--no-progress", "--resume")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=disk.env)
    assert done.returncode == 0, done.stderr
    _assert_finished(run, reference)


def test_full_disk_during_adapter_write_is_one_clear_error(
    llama_bundle: Path, reference: Reference, small_disk: _InjectedDisk | _Tmpfs
) -> None:
    """No checkpoints; the disk fills while the trained adapter is written."""
    disk = small_disk
    run = disk.root / "run"
    disk.fill(leave=4 * PAGE)  # the adapter config fits, the weights (~30 kB) do not
    argv = [*_argv(llama_bundle, run, "--no-progress"), "--save-every", "0"]
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=disk.env)
    assert failed.returncode == 2, failed.stderr
    line = _one_error_line(failed.stderr)
    assert f"{run / 'adapter'}: " in line and "trained adapter" in line and "no checkpoint" in line
    assert not any(run.iterdir()), "a partial adapter or its staging dir was left behind"

    disk.free()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=disk.env)
    assert done.returncode == 0, done.stderr
    _assert_same_adapter(run, reference)
