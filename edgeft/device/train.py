"""Device stage: fine-tune a bundle's LoRA adapter on local JSONL data. Entry: :func:`train`.

Checkpoints hold the LoRA tensors, the AdamW moments and the data position; each is written in
a staging directory, fsynced and renamed, so ``--resume`` always finds a complete one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.device.adapter import load_adapter, save_adapter
from edgeft.device.data import Batch, Example, make_batches
from edgeft.device.evaluate import mean_loss
from edgeft.device.labelled import collate_for, examples_for
from edgeft.device.optim import AdamW, linear_schedule
from edgeft.device.planner import available_memory_mb, peak_rss_mb, plan
from edgeft.device.runtime import LoraGraphs, graph_session, packs_int4, training_variants
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.errors import EdgeftError
from edgeft.fsutil import atomic_write_json, fsync_dir, fsync_tree, is_disk_full, sha256_file, write_bytes
from edgeft.profiles import RuntimeSettings, runtime_settings
from edgeft.tasks import Task

CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


@dataclass
class TrainConfig:
    bundle: Path
    data: Path
    out: Path
    eval_data: Path | None = None
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 2e-4
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    max_seq_len: int | None = None
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: only by time)
    save_minutes: float = 5.0  # and whenever this much training time passed since the last (0: off)
    resume: bool = False
    truncate: bool = False
    threads: int | None = None
    progress: bool = True
    profile: str | None = None
    memory_budget_mb: float | None = None
    provider: str | None = None
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)
    recompute: str = "auto"  # "none" | "layers" | "auto": layer recomputation only when needed to fit
    prepack: str = "auto"  # "off" | "on" | "auto": pre-packed int4 weights (faster) when their copy fits
    init_adapter: Path | None = None  # start from this PEFT adapter instead of the bundle's initial one (edgeft fleet)


@dataclass
class _Position:
    """Where the data stream stands: the next micro-batch is ``batches(epoch)[index]``."""

    epoch: int = 0
    index: int = 0


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the summary that is also written to ``RUN_DIR/summary.json``."""
    _check_config(cfg)
    settings = runtime_settings(cfg.profile, "train", cfg.threads, cfg.provider, cfg.memory_budget_mb)
    bundle = Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key)
    tok = BundleTokenizer.from_dir(bundle.root)
    seq_len = bundle.seq_len(cfg.max_seq_len)
    task = Task.of(bundle.manifest)
    examples = examples_for(task, cfg.data, tok, seq_len, truncate=cfg.truncate)
    evals = examples_for(task, cfg.eval_data, tok, seq_len, truncate=cfg.truncate) if cfg.eval_data else None
    batch_seq = min(seq_len, max(len(e.input_ids) for e in examples + (evals or [])))
    budget = settings.memory_budget_mb
    recompute = check_memory(bundle, cfg.batch_size, batch_seq, budget, cfg.recompute, cfg.prepack)
    prepack = check_prepack(bundle, cfg.batch_size, batch_seq, budget, recompute, cfg.prepack)
    run = _Run(cfg, bundle, tok, examples, settings, recompute, prepack)
    return run.execute(evals)


def check_prepack(
    bundle: Bundle, batch_size: int, seq_len: int, budget_mb: float | None, recompute: bool, mode: str
) -> bool:
    """Pre-pack the int4 weights (``mode``: off | on | auto)? MatMulNBits without its packed layout
    dequantizes the whole weight to float32 on every call: packed, a step takes ~0.6x the time and
    less memory (Llama-3.2-1B int4, 2 cores: 16.4 -> 10.5 s, 3982 -> 3008 MB). ``auto``: whenever
    that needs no more memory, else when it fits the budget (int8 compute's layout is larger)."""
    if mode == "off" or not packs_int4(bundle):
        return False
    if mode == "on":
        return True
    estimate = plan(bundle, batch_size, seq_len)
    if estimate.train_prepack_mb <= 0:
        return True
    budget = budget_mb or available_memory_mb()
    return budget is not None and _need(estimate, recompute, True) <= budget


def _need(estimate, recompute: bool, packed: bool) -> float:
    """The planned training peak of one setting (MB)."""
    peak = estimate.train_recompute_peak_mb if recompute else estimate.train_peak_mb
    return peak + (estimate.train_prepack_mb if packed else 0.0)


def check_memory(
    bundle: Bundle, batch_size: int, seq_len: int, budget_mb: float | None, mode: str = "auto", prepack: str = "off"
) -> bool:
    """Pick layer recomputation or not (``mode``: none | layers | auto) and refuse, with the
    estimate and a way out, a run the device cannot hold (instead of being killed by the OOM
    killer halfway). ``auto`` recomputes only when the run would not fit otherwise. The budget is
    --memory-budget, the profile's, or the memory available right now. ``prepack``: the --prepack
    mode, whose int4 layouts (when it will take them) change the need. Returns: recompute?"""
    variants = training_variants(bundle)
    if mode == "none" and False not in variants:
        raise EdgeftError(f"{bundle.root}: exported with --recompute layers; it has no training graph without it")
    if mode == "layers" and True not in variants:
        raise EdgeftError(f"{bundle.root}: exported with --recompute none; re-export with --recompute auto or layers")
    choices = [v for v in (False, True) if v in variants and mode in ("auto", "layers" if v else "none")]
    budget = budget_mb or available_memory_mb()
    if budget is None:
        return choices[0]
    estimate = plan(bundle, batch_size, seq_len)
    packed = packs_int4(bundle) and (prepack == "on" or prepack == "auto" and estimate.train_prepack_mb <= 0)
    for recompute in choices:
        if _need(estimate, recompute, packed) <= budget:
            return recompute
    best = choices[-1]  # the smallest variant allowed: the hints estimate with it

    def peak(batch: int, seq: int) -> float:
        return _need(plan(bundle, batch, seq), best, packed)

    hints = []
    if True not in variants and mode == "auto":
        hints.append(f"a bundle exported with --recompute auto (~{_need(estimate, True, packed):.0f} MB)")
    if batch_size > 1:
        smaller = max(1, batch_size // 2)
        hints.append(f"--batch-size {smaller} --grad-accum {batch_size // smaller} (~{peak(smaller, seq_len):.0f} MB)")
    if seq_len > 64:
        hints.append(f"--max-seq-len {seq_len // 2} --truncate (~{peak(batch_size, seq_len // 2):.0f} MB)")
    if not bundle.manifest.get("quantization"):
        hints.append("a bundle exported with --quantize int8 or int4 (base weights in 1/4 or 1/6 of the memory)")
    raise EdgeftError(
        f"training needs about {peak(batch_size, seq_len):.0f} MB at batch {batch_size} x {seq_len} tokens"
        f"{' with layer recomputation' if best else ''} but the memory budget is {budget:.0f} MB; "
        f"try {', or '.join(hints)}, or raise --memory-budget"
    )


def _check_config(cfg: TrainConfig) -> None:
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise EdgeftError("give --max-steps or --epochs, not both")
    for name in ("batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise EdgeftError(f"--{name.replace('_', '-')} must be at least 1")
    if (cfg.max_steps is not None and cfg.max_steps < 1) or (cfg.epochs is not None and cfg.epochs <= 0):
        raise EdgeftError("--max-steps and --epochs must be positive")
    if cfg.lr <= 0 or cfg.warmup_steps < 0 or cfg.save_every < 0 or cfg.save_minutes < 0:
        raise EdgeftError("--lr must be positive; --warmup-steps, --save-every and --save-minutes must not be negative")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise EdgeftError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not cfg.resume:
        raise EdgeftError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")


class _Run:
    """State of one training run: model, optimizer, data position, history."""

    def __init__(
        self,
        cfg: TrainConfig,
        bundle: Bundle,
        tok: BundleTokenizer,
        examples: list[Example],
        settings: RuntimeSettings,
        recompute: bool = False,
        prepack: bool = False,
    ):
        self.cfg, self.bundle, self.examples, self.settings = cfg, bundle, examples, settings
        self.recompute, self.prepack = recompute, prepack
        self.pad = tok.pad_token_id
        self.collate = collate_for(Task.of(bundle.manifest))  # the task's labels and batch shapes
        self.out = Path(cfg.out)
        self.n_batches = math.ceil(len(examples) / cfg.batch_size)
        self.total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1) * self.n_batches / cfg.grad_accum))
        opt = bundle.manifest["optimizer"]
        self.optim = AdamW(tuple(opt["betas"]), opt["eps"], opt["weight_decay"], opt["max_grad_norm"])
        self.pos, self.step, self.losses, self.tokens, self.seconds = _Position(), 0, [], 0, 0.0
        self.grad_norms: list[float] = []  # pre-clip, per step (clipping engages above max_grad_norm)
        self._saved_at = time.monotonic()
        self.fingerprint = self._fingerprint()
        self._batches: tuple[int, list[Batch]] | None = None

    def _fingerprint(self) -> dict:
        keep = (
            "max_steps",
            "epochs",
            "lr",
            "warmup_steps",
            "batch_size",
            "grad_accum",
            "max_seq_len",
            "seed",
            "truncate",
        )
        fp = {k: v for k, v in asdict(self.cfg).items() if k in keep}
        fp["data_sha256"] = sha256_file(self.cfg.data)
        fp["bundle_manifest_sha256"] = hashlib.sha256(
            json.dumps(self.bundle.manifest, sort_keys=True).encode()
        ).hexdigest()
        start = Path(self.cfg.init_adapter or "") / "adapter_model.safetensors"
        if self.cfg.init_adapter is not None and start.is_file():  # (a missing one: load_adapter says so)
            fp["init_adapter_sha256"] = sha256_file(start)
        return fp

    def execute(self, evals: list[Example] | None) -> dict:
        lora = self._restore() if self.cfg.resume else None
        if lora is None:
            start = self.cfg.init_adapter or self.bundle.path(self.bundle.manifest["lora"]["init_adapter"])
            lora = load_adapter(start, self.bundle)
        self.lora = {n: np.array(lora[n], np.float32) for n in lora}  # owned here, updated in place
        del lora  # the loaded copy would stay alive through the whole run
        session = graph_session(self.settings.provider, self.settings.threads, self.prepack)
        model = LoraGraphs(self.bundle, session, self.recompute)
        before = self._eval_loss(model, evals)
        self._loop(model)
        after = self._eval_loss(model, evals)
        with _disk_full_is_an_error(self.out / "adapter", "the trained adapter", self.out / CHECKPOINTS):
            save_adapter(self.out / "adapter", self.bundle, self.lora)
        return self._summary(before, after)

    def _eval_loss(self, model: LoraGraphs, evals: list[Example] | None) -> float | None:
        if not evals:
            return None
        return mean_loss(model, self.lora, evals, self.cfg.batch_size, self.pad, self.collate)[0]

    def _loop(self, model: LoraGraphs) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=self.total,
            initial=self.step,
            unit="step",
            desc="train",
            disable=not self.cfg.progress,
            mininterval=0.1 if sys.stderr.isatty() else 2.0,
        )
        while self.step < self.total:
            t0 = time.perf_counter()
            loss, ntok = self._optimizer_step(model)
            self.seconds += time.perf_counter() - t0
            self.step += 1
            self.losses.append(loss)
            self.grad_norms.append(self.optim.last_grad_norm)
            self.tokens += ntok
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens / max(self.seconds, 1e-9):.0f}", refresh=False)
            if self._checkpoint_due() and self.step < self.total:
                self._save_checkpoint()
                self._saved_at = time.monotonic()
        bar.close()

    def _checkpoint_due(self) -> bool:
        """Every --save-every steps, and every --save-minutes of wall time (a device that loses power
        loses at most that much work by default)."""
        by_steps = self.cfg.save_every and self.step % self.cfg.save_every == 0
        by_time = self.cfg.save_minutes and time.monotonic() - self._saved_at >= 60 * self.cfg.save_minutes
        return bool(by_steps or by_time)

    def _optimizer_step(self, model: LoraGraphs) -> tuple[float, int]:
        """Gradients of the step's micro-batches summed (each weighted by the step's token count),
        then one AdamW update of the LoRA tensors in place."""
        micro = [self._next_batch() for _ in range(self.cfg.grad_accum)]
        denominator = float(sum(b.num_loss_tokens for b in micro))
        loss, total = 0.0, None
        for batch in micro:
            part, grads = model.loss_and_grads(self.lora, batch, denominator)
            loss += part
            if total is None:
                total = {n: g.copy() for n, g in grads.items()} if len(micro) > 1 else grads
            else:
                for n, g in grads.items():
                    total[n] += g
        lr = linear_schedule(self.step, self.cfg.lr, self.cfg.warmup_steps, self.total)
        self.optim.step(self.lora, total, lr)
        return loss, sum(b.num_tokens for b in micro)

    def _next_batch(self) -> Batch:
        if self._batches is None or self._batches[0] != self.pos.epoch:
            self._batches = (
                self.pos.epoch,
                make_batches(self.examples, self.cfg.batch_size, self.pad, self.cfg.seed, self.pos.epoch, self.collate),
            )
        batch = self._batches[1][self.pos.index]
        self.pos.index += 1
        if self.pos.index == len(self._batches[1]):
            self.pos = _Position(self.pos.epoch + 1, 0)
        return batch

    def _save_checkpoint(self) -> None:
        root = self.out / CHECKPOINTS
        _test_mark("begin")
        with _disk_full_is_an_error(root, f"checkpoint step {self.step}", root):
            self._write_checkpoint(root)
        _prune_checkpoints(root)
        _test_mark("done")

    def _write_checkpoint(self, root: Path) -> None:
        """Stage the checkpoint in a hidden '.step-*' dir, fsync it, then rename it visible: a reader
        (``--resume``) sees a complete checkpoint or none, whatever moment the process dies at."""
        from safetensors.numpy import save

        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".step-", dir=root))
        try:
            # Serialize here and write the bytes ourselves: safetensors' save_file reports a full disk
            # as a SafetensorError carrying only text, while a plain write raises OSError(ENOSPC).
            write_bytes(staging / "lora.safetensors", save(self.lora))
            _test_pause("after-lora")
            write_bytes(staging / "optimizer.safetensors", save(self.optim.state_tensors()))
            _test_pause("after-optimizer")
            state = {
                "step": self.step,
                "position": asdict(self.pos),
                "losses": self.losses,
                "grad_norms": self.grad_norms,
                "tokens": self.tokens,
                "seconds": self.seconds,
                "config": self.fingerprint,
            }
            atomic_write_json(staging / "state.json", state)
            _test_pause("after-state")
            fsync_tree(staging)
            os.replace(staging, root / f"step-{self.step:08d}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fsync_dir(root)  # the rename must be durable before pruning deletes an older checkpoint
        _test_pause("before-prune")

    def _restore(self) -> dict[str, np.ndarray] | None:
        """Load the newest complete checkpoint; None when there is none yet."""
        from safetensors.numpy import load_file

        # What a killed run left: staging dirs, and checkpoints it had no time to prune (else
        # repeated kills in that window would pile them up on the device's disk).
        _remove_stale_staging(self.out / CHECKPOINTS)
        _prune_checkpoints(self.out / CHECKPOINTS)
        found = _complete_checkpoints(self.out / CHECKPOINTS)
        if not found:
            return None
        ckpt = found[-1]
        try:
            state = json.loads((ckpt / "state.json").read_text())
            state["config"], state["position"], state["step"]  # noqa: B018  (presence check)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise EdgeftError(
                f"{ckpt / 'state.json'}: unreadable checkpoint ({e}); delete {ckpt} to resume from the one before"
            ) from None
        changed = [k for k, v in self.fingerprint.items() if state["config"].get(k) != v]
        if changed:
            raise EdgeftError(
                f"{ckpt}: cannot resume, these settings or inputs changed since it was written: {', '.join(changed)}"
            )
        self.step, self.losses, self.tokens, self.seconds = (
            state["step"],
            state["losses"],
            state["tokens"],
            state["seconds"],
        )
        self.grad_norms = state.get("grad_norms", [])
        self.pos = _Position(**state["position"])
        self.optim.load_state_tensors(load_file(str(ckpt / "optimizer.safetensors")), self.step)
        return load_file(str(ckpt / "lora.safetensors"))

    def _summary(self, before: float | None, after: float | None) -> dict:
        summary = {
            "steps": self.step,
            "losses": self.losses,
            "grad_norms": self.grad_norms,
            "eval_loss_before": before,
            "eval_loss": after,
            "tokens": self.tokens,
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
            "peak_rss_mb": peak_rss_mb(),
            "recompute": self.recompute,
            "prepack": self.prepack,
            "seconds": self.seconds,
            "adapter": str(self.out / "adapter"),
        }
        with _disk_full_is_an_error(self.out / "summary.json", "the run summary", self.out / CHECKPOINTS):
            atomic_write_json(self.out / "summary.json", summary)
        return summary


def _complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints, oldest first (staging dirs start with '.', so they never match)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def _prune_checkpoints(root: Path) -> None:
    """Keep the newest ``KEEP_CHECKPOINTS``. Each older one is first renamed hidden (one atomic
    step), so a kill during the delete never leaves a half-deleted checkpoint that looks complete."""
    for old in _complete_checkpoints(root)[:-KEEP_CHECKPOINTS]:
        hidden = root / f".{old.name}.pruned"  # '.step-*': removed by _remove_stale_staging if left
        os.replace(old, hidden)
        shutil.rmtree(hidden)


def _remove_stale_staging(root: Path) -> None:
    """Delete '.step-*' dirs (unfinished checkpoints, half-pruned ones) that a killed run left.
    Safe because a run directory has one writer: this runs at ``--resume``, before training."""
    if root.is_dir():
        for stale in root.glob(".step-*"):
            shutil.rmtree(stale, ignore_errors=True)


def _test_pause(stage: str) -> None:
    """Test-only hook, unset in real use: ``EDGEFT_TEST_SLOW_CHECKPOINT=SECONDS`` sleeps between the
    stages of a checkpoint write so tests/test_crash_safety.py can SIGKILL inside a write on purpose."""
    _test_mark(stage)
    delay = os.environ.get("EDGEFT_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


def _test_mark(stage: str) -> None:
    """Test-only hook, unset in real use: ``EDGEFT_TEST_CHECKPOINT_MARKS=FILE`` appends each stage a
    checkpoint write reaches ("begin" ... "done") to FILE, so a test can tell where a kill landed."""
    marks = os.environ.get("EDGEFT_TEST_CHECKPOINT_MARKS")
    if marks:
        with open(marks, "a") as f:
            f.write(stage + "\n")


@contextmanager
def _disk_full_is_an_error(path: Path, writing: str, checkpoints: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing into one clear EdgeftError. The writers delete
    their own staging files on the way out, so the newest complete checkpoint stays the resume point."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        found = _complete_checkpoints(checkpoints)
        kept = (
            f"the previous checkpoint {found[-1]} is intact; free some space and rerun with --resume"
            if found
            else "no checkpoint was written yet; free some space and rerun with --resume to start over"
        )
        raise EdgeftError(f"{path}: no space left on device while writing {writing}; {kept}") from None
