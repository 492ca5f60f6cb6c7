"""Device training: learning, checkpoints and resume, determinism, PEFT round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import DATA
from helpers import first_batch, ort_logits, scored_positions, torch_loss_sum, torch_peft_model

from edgeft.bundle import Bundle
from edgeft.device.adapter import load_adapter
from edgeft.device.train import TrainConfig, _Run, train
from edgeft.errors import EdgeftError


def _cfg(bundle, out, **kw):
    base = dict(max_steps=8, lr=5e-3, batch_size=4, progress=False)
    base.update(kw)
    return TrainConfig(bundle, DATA / "train.jsonl", out, **base)


def _adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_learnable_data_lowers_eval_loss(llama_bundle, tmp_path):
    summary = train(
        _cfg(
            llama_bundle,
            tmp_path / "run",
            eval_data=DATA / "eval.jsonl",
            max_steps=80,
            batch_size=8,
            warmup_steps=5,
            lr=1e-2,
        )
    )
    assert summary["steps"] == 80 and len(summary["losses"]) == 80
    assert summary["eval_loss"] < 0.6 * summary["eval_loss_before"]
    assert np.mean(summary["losses"][-10:]) < np.mean(summary["losses"][:10])
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("steps", "losses", "eval_loss", "tokens_per_second", "peak_rss_mb", "seconds"):
        assert on_disk[key] == summary[key]
    assert summary["tokens_per_second"] > 0 and summary["peak_rss_mb"] > 10


def test_same_seed_same_adapter_other_seed_differs(llama_bundle, tmp_path):
    a = _adapter_after(llama_bundle, tmp_path / "a", seed=3)
    b = _adapter_after(llama_bundle, tmp_path / "b", seed=3)
    c = _adapter_after(llama_bundle, tmp_path / "c", seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def _adapter_after(bundle, out, **kw):
    train(_cfg(bundle, out, **kw))
    return _adapter(out)


def test_checkpoints_are_complete_and_pruned(llama_bundle, tmp_path):
    run = tmp_path / "run"
    train(_cfg(llama_bundle, run, max_steps=9, save_every=2))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-00000006", "step-00000008"]  # the last two kept, no staging dirs left
    state = json.loads((run / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["step"] == 8 and len(state["losses"]) == 8
    assert set(state["position"]) == {"epoch", "index"}
    assert {f.name for f in (run / "checkpoints" / "step-00000008").iterdir()} == {
        "lora.safetensors",
        "optimizer.safetensors",
        "state.json",
    }


def test_checkpoints_by_time_are_on_by_default(llama_bundle, tmp_path, monkeypatch):
    """A device that loses power loses at most --save-minutes of work (default 5): checkpoints are
    written by wall time even without --save-every; 0 turns that off."""
    import time

    from edgeft.device import train as train_module

    assert TrainConfig(llama_bundle, DATA / "train.jsonl", tmp_path).save_minutes == 5.0
    clock = iter(range(0, 10**6, 200))  # each look at the clock: 200 s later, so 5 min pass every 2 steps
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    train(_cfg(llama_bundle, tmp_path / "timed", max_steps=6))
    saved = sorted(p.name for p in (tmp_path / "timed" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000002", "step-00000004"]
    monkeypatch.setattr(train_module.time, "monotonic", time.monotonic)
    train(_cfg(llama_bundle, tmp_path / "off", max_steps=4, save_minutes=0))
    assert not (tmp_path / "off" / "checkpoints").exists()


def test_resume_after_interruption_equals_uninterrupted_run(llama_bundle, tmp_path, monkeypatch):
    """Interrupted in process after step 7, then resumed: bit-exact (measured: ONNX Runtime's
    deterministic compute + numpy AdamW). A KeyboardInterrupt unwinds, so clean-up code still runs:
    this is Ctrl-C, not power loss or a kill; tests/test_crash_safety.py SIGKILLs real processes."""
    straight = _adapter_after(llama_bundle, tmp_path / "straight", max_steps=10, save_every=3)
    real_step = _Run._optimizer_step

    def dying_step(self, model):
        if self.step == 7:
            raise KeyboardInterrupt  # Ctrl-C after step 7 (last checkpoint: step 6)
        return real_step(self, model)

    monkeypatch.setattr(_Run, "_optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(llama_bundle, tmp_path / "resumed", max_steps=10, save_every=3))
    assert not (tmp_path / "resumed" / "adapter").exists()
    monkeypatch.setattr(_Run, "_optimizer_step", real_step)
    summary = train(_cfg(llama_bundle, tmp_path / "resumed", max_steps=10, save_every=3, resume=True))
    resumed = _adapter(tmp_path / "resumed")
    assert summary["steps"] == 10 and len(summary["losses"]) == 10
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)


def test_resume_refuses_changed_settings(llama_bundle, tmp_path):
    train(_cfg(llama_bundle, tmp_path / "run", max_steps=4, save_every=2))
    with pytest.raises(EdgeftError, match="lr"):
        train(_cfg(llama_bundle, tmp_path / "run", max_steps=4, save_every=2, lr=1e-3, resume=True))


def test_trained_adapter_loads_in_peft_with_equal_logits(factory, tmp_path):
    """edgeft's adapter -> PeftModel.from_pretrained: same loss and logits as ONNX Runtime."""
    import torch

    path = factory.bundle("llama")
    train(_cfg(path, tmp_path / "run", max_steps=10))
    adapter = tmp_path / "run" / "adapter"
    model = torch_peft_model(factory.model("llama"), adapter)
    batch = first_batch(path, DATA / "eval.jsonl")
    lora = load_adapter(adapter, Bundle.open(path))
    with torch.no_grad():
        ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
        ref_logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
        ref_loss = torch_loss_sum(model, batch).item()
    scored = scored_positions(batch)
    np.testing.assert_allclose(ort_logits(path, lora, batch), ref_logits[scored], atol=1e-4, rtol=1e-4)
    from edgeft.device.runtime import LoraGraphs

    assert LoraGraphs(Bundle.open(path)).loss(lora, batch, 1.0) == pytest.approx(ref_loss, rel=1e-5)
