"""The loss head in chunks of rows (edgeft/host/losshead.py): a training graph whose head runs in a
Loop over 8 labelled rows at a time gives the loss and LoRA gradients of the unchunked graph, for
every row count (fewer than a chunk, a multiple of it, a remainder) and every graph variant."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_peft_adapter

from edgeft.bundle import Bundle
from edgeft.device.adapter import load_adapter
from edgeft.device.data import Batch
from edgeft.device.runtime import LoraGraphs

CASES = {
    "llama": {},
    "gemma3_text": {},  # tied embeddings, logit softcap
    "phi3-int4": {"quantize": "int4"},  # lm_head as MatMulNBits in the forward and the backward
    "qwen2-int8": {"quantize": "int8"},  # lm_head dequantized inside the loop
}


def _batches(vocab: int):
    """Labelled rows: 3 (under a chunk), 16 (two chunks), 61 (seven and a remainder of 5)."""
    rng = np.random.default_rng(0)
    for batch, seq, labelled in ((1, 9, 3), (2, 12, 16), (3, 40, 61)):
        ids = rng.integers(0, vocab, (batch, seq))
        mask = np.ones_like(ids)
        mask[-1, -3:] = 0  # padding: no label there either
        labels = np.full_like(ids, -100)
        slots = [(b, t) for b in range(batch) for t in range(1, seq - 3 if b == batch - 1 else seq)]
        for i in rng.choice(len(slots), labelled, replace=False):
            labels[slots[i]] = ids[slots[i]]
        yield Batch(ids, mask, labels, labelled, int(mask.sum()))


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_head_equals_the_whole_head(factory, tmp_path, case):
    model_type = case.split("-")[0]
    options = CASES[case]
    chunked = Bundle.open(factory.bundle(model_type, loss_chunk_rows=8, **options))
    whole = Bundle.open(factory.bundle(model_type, loss_chunk_rows=0, **options))
    assert chunked.manifest["graphs"]["training"]["loss_chunk_rows"] == 8
    assert "loss_chunk_rows" not in whole.manifest["graphs"]["training"]
    targets = chunked.manifest["lora"]["target_modules"]
    lora = load_adapter(make_peft_adapter(factory.model(model_type), tmp_path / "peft", targets=targets), chunked)
    for recompute in (False, True):
        graphs = LoraGraphs(chunked, recompute=recompute), LoraGraphs(whole, recompute=recompute)
        for batch in _batches(chunked.manifest["vocab_size"]):
            (loss, grads), (want_loss, want) = (g.loss_and_grads(lora, batch, 17.0) for g in graphs)
            assert loss == pytest.approx(want_loss, rel=1e-6)
            for name, w in want.items():
                assert np.abs(w).max() > 0, name
                assert np.abs(grads[name] - w).max() <= 1e-6 * np.abs(w).max(), (name, recompute)
            if not recompute:  # the eval graph's head is chunked as well
                assert graphs[0].loss(lora, batch, 17.0) == pytest.approx(graphs[1].loss(lora, batch, 17.0), rel=1e-6)


def test_the_head_runs_inside_the_loop(factory):
    """Structure: the main graph keeps no vocabulary-wide op; the Loop's body holds the head."""
    import onnx

    path = factory.bundle("llama", loss_chunk_rows=8)
    for name in ("training_model.onnx", "training_recompute.onnx", "eval_model.onnx"):
        graph = onnx.load(str(path / name), load_external_data=False).graph
        ops = {n.op_type for n in graph.node}
        assert "SoftmaxCrossEntropyLoss" not in ops and "MatMul" in ops, name
        (loop,) = [n for n in graph.node if n.op_type == "Loop"]
        body = {n.op_type for n in loop.attribute[0].g.node}
        head = {"SoftmaxCrossEntropyLoss", "MatMul"} | ({"Exp", "Gemm"} if "eval" not in name else set())
        assert head <= body, (name, body)
        assert "OneHot" not in body, "the cross-entropy's gradient scatter-adds -1 at the labels"


def test_export_cli_sets_the_chunk_and_refuses_a_negative_one(factory, tmp_path):
    import json

    from click.testing import CliRunner

    from edgeft.cli import main

    model = factory.model("llama")
    out = tmp_path / "bundle"
    result = CliRunner().invoke(main, ["export", str(model), "--out", str(out), "--loss-chunk-rows", "24"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["graphs"]["training"]["loss_chunk_rows"] == 24
    bad = CliRunner().invoke(main, ["export", str(model), "--out", str(tmp_path / "b"), "--loss-chunk-rows", "-1"])
    assert bad.exit_code == 2 and "--loss-chunk-rows" in bad.output and not (tmp_path / "b").exists()
    from edgeft.errors import EdgeftError
    from edgeft.host.export import ExportConfig, export_bundle

    with pytest.raises(EdgeftError, match="--loss-chunk-rows must be a whole number >= 0"):
        export_bundle(ExportConfig(model_dir=model, out=tmp_path / "c", loss_chunk_rows=-8))
    assert not (tmp_path / "c").exists()
