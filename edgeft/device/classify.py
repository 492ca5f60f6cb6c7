"""Device stage: classification bundles (seq-cls, token-cls) — metrics and predictions.

Entries for the CLI: :func:`evaluate_classifier` (``edgeft eval`` on such a bundle) and
:func:`predict`. :class:`Classifier` is shared with ``edgeft serve`` (``POST /v1/classify``):
one eval session of the bundle, any number of adapters, labels with probabilities.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.bundle import Bundle
from edgeft.device.data import IGNORE_INDEX
from edgeft.device.labelled import Labelled, collate_for, encode_text, examples_for, load_labelled
from edgeft.device.metrics import entities, entity_scores, label_scores
from edgeft.errors import EdgeftError
from edgeft.tasks import CLASSIFICATION, SEQ_CLS, Task, require

BASE = "base"  # the bundle's initial adapter (its head as exported)


class Classifier:
    """A classification bundle's tokenizer and eval session, with named adapters."""

    def __init__(self, bundle: str | Path | Bundle, provider: str | None = None, threads: int | None = None):
        from edgeft.device.adapter import load_adapter
        from edgeft.device.runtime import LoraGraphs, graph_session
        from edgeft.device.tokenizer import BundleTokenizer

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.task = Task.of(self.bundle.manifest)
        require(self.task, CLASSIFICATION, "classification")
        self.tokenizer = BundleTokenizer.from_dir(self.bundle.root)
        self.model = LoraGraphs(self.bundle, graph_session(provider, threads))
        self.collate = collate_for(self.task)
        initial = self.bundle.path(self.bundle.manifest["lora"]["init_adapter"])
        self.adapters: dict[str, dict[str, np.ndarray]] = {BASE: load_adapter(initial, self.bundle)}

    def add_adapter(self, name: str, path: str | Path) -> None:
        from edgeft.device.adapter import load_adapter

        if name == BASE:
            raise EdgeftError(f"adapter name {BASE!r} is reserved for the bundle's initial adapter")
        self.adapters[name] = load_adapter(path, self.bundle)

    def encode(self, text: str, truncate: bool = False) -> Labelled:
        from edgeft.device.data import _SampleError

        try:
            return encode_text(self.tokenizer, text, self.task, self.bundle.max_seq_len, truncate)
        except _SampleError as e:
            raise EdgeftError(str(e)) from None

    def run(self, examples: list[Labelled], adapter: str, batch_size: int = 8) -> tuple[float, list[np.ndarray]]:
        """Summed loss over the labelled items and each example's probabilities, in input order
        (seq-cls ``[labels]``, token-cls ``[tokens, labels]``)."""
        if adapter not in self.adapters:
            raise EdgeftError(f"unknown adapter {adapter!r} (loaded: {', '.join(self.adapters)})")
        total, probs = 0.0, []
        for start in range(0, len(examples), batch_size):
            group = examples[start : start + batch_size]
            batch = self.collate(group, self.tokenizer.pad_token_id)
            loss, logits = self.model.loss_and_logits(self.adapters[adapter], batch, 1.0, len(self.task.labels))
            total += loss
            p = _softmax(logits)
            probs += [p[i] if self.task.type == SEQ_CLS else p[i, : len(ex.input_ids)] for i, ex in enumerate(group)]
        return total, probs

    def predictions(self, examples: list[Labelled], adapter: str, batch_size: int = 8) -> list[dict]:
        """One result per example: label and probabilities (seq-cls) or word tags and entities (token-cls)."""
        _, probs = self.run(examples, adapter, batch_size)
        if self.task.type == SEQ_CLS:
            return [self._label(p) for p in probs]
        return [self._entities(ex, p) for ex, p in zip(examples, probs, strict=True)]

    def _label(self, p: np.ndarray) -> dict:
        best = int(p.argmax())
        names = self.task.labels
        return {"label": names[best], "score": float(p[best]), "probabilities": {n: float(x) for n, x in zip(names, p)}}

    def _entities(self, ex: Labelled, p: np.ndarray) -> dict:
        rows = p[ex.first_tokens]  # each word's first sub-word
        best = rows.argmax(axis=1)
        tags = [self.task.labels[k] for k in best]
        scores = rows[np.arange(len(best)), best]
        found = []
        for kind, first, last in entities(tags):
            words = ex.words[first : last + 1]
            item = {"type": kind, "text": " ".join(w.text for w in words), "words": [first, last]}
            if ex.text is not None:  # spans in the input text
                item.update(text=ex.text[words[0].start : words[-1].end], start=words[0].start, end=words[-1].end)
            item["score"] = float(scores[first : last + 1].mean())
            found.append(item)
        return {"tokens": [w.text for w in ex.words], "tags": tags, "entities": found}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# edgeft eval


def evaluate_classifier(cfg, bundle: Bundle) -> dict:
    """``edgeft eval`` on a classification bundle (``cfg``: an ``EvalConfig``; ``bundle``: opened).

    seq-cls: ``{"loss" (mean per text), "accuracy", "macro_f1", "examples", "per_label"}``;
    token-cls: ``{"loss" (mean per word), "precision", "recall", "f1" (entity level), "words",
    "entities", "per_type"}``."""
    from edgeft.profiles import runtime_settings

    settings = runtime_settings(cfg.profile, "train", cfg.threads)  # eval runs where training runs
    clf = Classifier(bundle, settings.provider, settings.threads)
    if cfg.adapter is not None:
        clf.add_adapter("adapter", cfg.adapter)
    examples = examples_for(clf.task, cfg.data, clf.tokenizer, clf.bundle.seq_len(cfg.max_seq_len), cfg.truncate)
    total, probs = clf.run(examples, "adapter" if cfg.adapter is not None else BASE, cfg.batch_size)
    count = sum(sum(x != IGNORE_INDEX for x in ex.labels) for ex in examples)
    names = list(clf.task.labels)
    if clf.task.type == SEQ_CLS:
        gold = [ex.labels[0] for ex in examples]
        scores = label_scores(gold, [int(p.argmax()) for p in probs], names)
        return {"loss": total / count, "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                "examples": count, "per_label": scores["per_label"]}  # fmt: skip
    gold = [[names[ex.labels[t]] for t in ex.first_tokens] for ex in examples]
    pred = [[names[k] for k in p[ex.first_tokens].argmax(axis=1)] for ex, p in zip(examples, probs, strict=True)]
    scores = entity_scores(gold, pred)
    return {"loss": total / count, "precision": scores["precision"], "recall": scores["recall"], "f1": scores["f1"],
            "words": count, "entities": sum(s["support"] for s in scores["per_type"].values()),
            "per_type": scores["per_type"]}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# edgeft predict


@dataclass
class PredictConfig:
    bundle: Path
    text: list[str] = field(default_factory=list)
    data: Path | None = None
    adapter: Path | None = None
    batch_size: int = 8
    max_seq_len: int | None = None
    truncate: bool = False
    threads: int | None = None
    profile: str | None = None
    trusted_key: Path | None = None  # public key the bundle must be signed by (default: env EDGEFT_TRUSTED_KEY)


def predict(cfg: PredictConfig, out=None) -> list[dict]:
    """Print one JSON line per input: the text (or tokens) with its label and probabilities
    (seq-cls), or its word tags and entities with spans (token-cls)."""
    from edgeft.profiles import runtime_settings

    out = out or sys.stdout
    if bool(cfg.text) == (cfg.data is not None):
        raise EdgeftError("give --text or --data (one of them)")
    if cfg.batch_size < 1:
        raise EdgeftError("--batch-size must be at least 1")
    settings = runtime_settings(cfg.profile, "serve", cfg.threads)
    clf = Classifier(Bundle.open(cfg.bundle, trusted_key=cfg.trusted_key), settings.provider, settings.threads)
    adapter = BASE
    if cfg.adapter is not None:
        clf.add_adapter("adapter", cfg.adapter)
        adapter = "adapter"
    seq_len = clf.bundle.seq_len(cfg.max_seq_len)
    if cfg.data is not None:
        examples = load_labelled(cfg.data, clf.tokenizer, clf.task, seq_len, cfg.truncate, require_labels=False)
    else:
        examples = [_encode_arg(clf, t, i, seq_len, cfg.truncate) for i, t in enumerate(cfg.text)]
    results = []
    for ex, result in zip(examples, clf.predictions(examples, adapter, cfg.batch_size), strict=True):
        head = {"text": ex.text} if ex.text is not None else {}
        if ex.line:
            head = {"line": ex.line, **head}
        result = {**head, **result}
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        results.append(result)
    out.flush()
    return results


def _encode_arg(clf: Classifier, text: str, index: int, seq_len: int, truncate: bool) -> Labelled:
    from edgeft.device.data import _SampleError

    try:
        return encode_text(clf.tokenizer, text, clf.task, seq_len, truncate)
    except _SampleError as e:
        raise EdgeftError(f"--text #{index + 1}: {e}") from None
