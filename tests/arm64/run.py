"""`make test-arm64`: edgeft's device side on Linux aarch64, emulated by qemu-user, against x86_64.

tests/arm64/root.sh builds (once) a Debian arm64 root with the working tree's edgeft installed. Here,
on the host, a tiny model is exported to a bundle; the root then trains an adapter, evaluates it
and generates with it, and the x86_64 device venv (.venv-device) evaluates and generates with the
same adapter: the eval losses must agree within 1e-5 and the greedy text must be identical. The
aarch64-trained adapter must load in PEFT on the host and give edgeft's loss there.

Training on aarch64 needs an onnxruntime that can train there; until the `device` extra has one,
EDGEFT_ARM64_TRAIN=0 makes the aarch64 train and eval steps expected failures (they still run and
say why), and generation uses an adapter trained on x86_64 instead. Exit status: 0 when nothing
failed (or the whole test was skipped: not root, no binfmt_misc), 1 otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT_SH = REPO / "tests" / "arm64" / "root.sh"
# The same default as root.sh's; set here so both always name the same root.
ROOT = Path(os.environ.setdefault("EDGEFT_ARM64_ROOT", "/var/cache/edgeft/arm64-root"))
DEVICE_VENV = Path(os.environ.get("EDGEFT_DEVICE_VENV", REPO / ".venv-device"))
TRAIN_REQUIRED = os.environ.get("EDGEFT_ARM64_TRAIN", "1") != "0"
SKIPPED = 77  # root.sh's exit status after its one "skipped" line
WORK = ROOT / "tmp" / "edgeft-arm64"  # inside the root, so both sides read the same files
PROMPT = "Station pine hill: valve is failed. What should the crew do?"
# Few samples and steps: every aarch64 instruction is emulated.
TRAIN_LINES, EVAL_LINES = 32, 16
TRAIN_ARGS = ("--max-steps", "3", "--batch-size", "4", "--lr", "5e-3", "--warmup-steps", "1", "--no-progress")
LOSS_TOLERANCE = 1e-5  # aarch64 vs x86_64, same adapter (issue #11)
PEFT_TOLERANCE = 1e-4  # torch + PEFT vs ONNX Runtime, as in tests/test_train.py
TIMEOUT_S = 1800


@dataclass
class Step:
    name: str
    status: str  # pass, FAIL, xfail (expected failure, EDGEFT_ARM64_TRAIN=0), skip or info
    seconds: float | None
    detail: str


@dataclass
class Ran:
    ok: bool
    stdout: str
    error: str  # the last stderr line: edgeft's one-line "error: ..." when it refuses
    seconds: float


class Report:
    def __init__(self) -> None:
        self.steps: list[Step] = []

    def add(self, name: str, ok: bool, detail: str, seconds: float | None = None, expected: bool = True) -> bool:
        """Record a step; a failure that is not ``expected`` to pass counts as xfail."""
        status = "pass" if ok else ("FAIL" if expected else "xfail")
        self.steps.append(Step(name, status, seconds, detail))
        return ok

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, "skip", None, why))

    def note(self, name: str, detail: str) -> None:
        """A fact worth showing that is not a check."""
        self.steps.append(Step(name, "info", None, detail))

    def failed(self) -> int:
        return sum(s.status == "FAIL" for s in self.steps)

    def print(self) -> None:
        print(f"\n{'step':<38} {'result':<6} {'seconds':>7}  detail")
        for s in self.steps:
            seconds = f"{s.seconds:7.1f}" if s.seconds is not None else " " * 7
            print(f"{s.name:<38} {s.status:<6} {seconds}  {s.detail}")
        passed = sum(s.status == "pass" for s in self.steps)
        skipped = sum(s.status in ("skip", "xfail") for s in self.steps)
        print(f"test-arm64: {passed} passed, {self.failed()} failed, {skipped} skipped")


def run(cmd: list[str]) -> Ran:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = done.stderr.strip().splitlines()
    return Ran(done.returncode == 0, done.stdout, lines[-1] if lines else "", time.monotonic() - start)


def aarch64(*args: str) -> Ran:
    """edgeft inside the root, paths under WORK given as the root sees them."""
    inside = [f"/{Path(a).relative_to(ROOT)}" if a.startswith(str(ROOT)) else a for a in args]
    return run(["bash", str(ROOT_SH), "run", "/opt/venv/bin/edgeft", *inside])


def x86_64(*args: str) -> Ran:
    return run([str(DEVICE_VENV / "bin" / "edgeft"), *args])


def make_inputs() -> tuple[Path, Path, Path, Path]:
    """Tiny llama model and its bundle (exported here, on the host), and small data files."""
    from edgeft.host.tiny import make_tiny_model

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    model = make_tiny_model("llama", WORK / "model")
    bundle = WORK / "bundle"
    edgeft = Path(sys.executable).parent / "edgeft"
    subprocess.run([str(edgeft), "export", str(model), "--out", str(bundle), "--max-seq-len", "64"], check=True)
    data = REPO / "examples" / "data"
    train, evaluation = WORK / "train.jsonl", WORK / "eval.jsonl"
    train.write_text("".join((data / "train.jsonl").read_text().splitlines(True)[:TRAIN_LINES]))
    evaluation.write_text("".join((data / "eval.jsonl").read_text().splitlines(True)[:EVAL_LINES]))
    return model, bundle, train, evaluation


def check_machine(report: Report) -> None:
    """`edgeft devices check` in the root: the machine must say aarch64."""
    ran = aarch64("devices", "check")
    # Its lines are "label   value": "machine      aarch64, linux (...)", "onnxruntime  onnxruntime 1.32.0 (...)".
    facts = dict(line.split(None, 1) for line in ran.stdout.splitlines() if len(line.split(None, 1)) == 2)
    machine = facts.get("machine", "").split(",")[0]
    ok = ran.ok and machine == "aarch64"
    detail = f"{machine}; {facts.get('onnxruntime', '?')}" if ran.ok else ran.error
    report.add("devices check (aarch64)", ok, detail, ran.seconds)


def train_both(report: Report, bundle: Path, data: Path) -> tuple[Path | None, Path | None]:
    """Train with the same data and seed on both; returns (aarch64 adapter, x86_64 adapter)."""
    adapters = {}
    for name, side, expected in (("aarch64", aarch64, TRAIN_REQUIRED), ("x86_64", x86_64, True)):
        out = WORK / f"run-{name}"
        ran = side("train", str(bundle), "--data", str(data), "--out", str(out), *TRAIN_ARGS)
        detail = f"final loss {json.loads(ran.stdout.splitlines()[-1])['final_loss']:.4f}" if ran.ok else ran.error
        if report.add(f"train, 3 steps ({name})", ran.ok, detail, ran.seconds, expected):
            adapters[name] = out / "adapter"
    if len(adapters) == 2:
        report.note("adapter aarch64 vs x86_64", f"max |d| = {_max_difference(*adapters.values()):.1e}")
    return adapters.get("aarch64"), adapters.get("x86_64")


def _max_difference(a: Path, b: Path) -> float:
    from safetensors.numpy import load_file

    left, right = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
    return max(float(abs(left[k] - right[k]).max()) for k in left)


def eval_both(report: Report, bundle: Path, data: Path, adapter: Path) -> float | None:
    """Eval loss of one adapter on both; returns the aarch64 loss."""
    losses = {}
    for name, side in (("aarch64", aarch64), ("x86_64", x86_64)):
        ran = side("eval", str(bundle), "--data", str(data), "--adapter", str(adapter))
        loss = json.loads(ran.stdout.splitlines()[-1])["loss"] if ran.ok else None
        expected = TRAIN_REQUIRED or name == "x86_64"  # today's aarch64 eval needs the training API too
        if report.add(f"eval ({name})", ran.ok, f"loss {loss:.7f}" if ran.ok else ran.error, ran.seconds, expected):
            losses[name] = loss
    if len(losses) == 2:
        delta = abs(losses["aarch64"] - losses["x86_64"])
        report.add("eval loss aarch64 vs x86_64", delta <= LOSS_TOLERANCE, f"|d| = {delta:.1e} (<= {LOSS_TOLERANCE:g})")
    else:
        report.skip("eval loss aarch64 vs x86_64", "no loss from one side")
    return losses.get("aarch64")


def generate_both(report: Report, bundle: Path, adapter: Path) -> None:
    """Greedy text with one adapter on both (a token apart changes the text)."""
    texts = {}
    for name, side in (("aarch64", aarch64), ("x86_64", x86_64)):
        ran = side("generate", str(bundle), "--prompt", PROMPT, "--adapter", str(adapter), "--max-new-tokens", "12")
        detail = repr(ran.stdout.rstrip("\n")) if ran.ok else ran.error
        if report.add(f"generate, 12 tokens ({name})", ran.ok, detail, ran.seconds):
            texts[name] = ran.stdout
    if len(texts) == 2:
        same = texts["aarch64"] == texts["x86_64"]
        report.add("greedy text aarch64 vs x86_64", same, "identical" if same else "differs")


def peft_check(report: Report, model: Path, bundle: Path, data: Path, adapter: Path, edgeft_loss: float | None) -> None:
    """The aarch64-trained adapter in PEFT on the host: every tensor loads, and (when the aarch64
    eval ran) torch + PEFT's loss on the eval data equals edgeft's."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.numpy import load_file

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import torch_loss_sum, torch_peft_model

    start = time.monotonic()
    peft_model = torch_peft_model(model, adapter)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = {k: v.numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    same = saved.keys() == loaded.keys() and all((saved[k] == loaded[k]).all() for k in saved)
    odd = sorted(saved.keys() ^ loaded.keys())[:3]
    detail = f"{len(saved)} tensors loaded as saved" if same else f"keys or values differ (e.g. {odd})"
    report.add("PEFT loads the aarch64 adapter (host)", same, detail, time.monotonic() - start)
    if edgeft_loss is None:
        report.skip("PEFT loss vs aarch64 eval loss", "no aarch64 eval loss")
        return
    with torch.no_grad():
        total, tokens = 0.0, 0
        for batch in _eval_batches(bundle, data):
            total += torch_loss_sum(peft_model, batch).item()
            tokens += batch.num_loss_tokens
    delta = abs(total / tokens - edgeft_loss)
    report.add("PEFT loss vs aarch64 eval loss", delta <= PEFT_TOLERANCE, f"|d| = {delta:.1e} (<= {PEFT_TOLERANCE:g})")


def _eval_batches(bundle: Path, data: Path) -> list:
    from edgeft.device.data import load_examples, make_batches
    from edgeft.device.tokenizer import BundleTokenizer

    tok = BundleTokenizer.from_dir(bundle)
    return make_batches(load_examples(data, tok, 64), 8, tok.pad_token_id, seed=0, epoch=0)


def exclusive() -> int:
    """Serialise runs on this machine: they share the root's /opt/edgeft and WORK. The lock lives
    in /tmp so that a run without root can still get as far as root.sh's skip line."""
    fd = os.open("/tmp/edgeft-test-arm64.lock", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("test-arm64: waiting for another run on this machine", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def main() -> int:
    exclusive()
    prepared = subprocess.run(["bash", str(ROOT_SH), "prepare"]).returncode
    if prepared == SKIPPED:
        return 0
    if prepared:
        print(f"test-arm64: preparing the arm64 root failed (exit {prepared})")
        return 1
    model, bundle, train_data, eval_data = make_inputs()
    report = Report()
    check_machine(report)
    trained_aarch64, trained_x86 = train_both(report, bundle, train_data)
    # Without an aarch64-trained adapter, the x86_64 one still makes a fair comparison of inference.
    adapter = trained_aarch64 or trained_x86
    if adapter is None:
        report.print()
        return 1
    if trained_aarch64 is None:
        report.note("adapter for eval and generate", "the x86_64-trained one (no aarch64-trained one)")
    loss = eval_both(report, bundle, eval_data, adapter)
    generate_both(report, bundle, adapter)
    if trained_aarch64 is not None:
        peft_check(report, model, bundle, eval_data, trained_aarch64, loss)
    else:
        report.skip("PEFT loads the aarch64 adapter (host)", "no aarch64-trained adapter")
    report.print()
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
