"""Classification metrics on the device (numpy only, no scikit-learn or seqeval).

- seq-cls: accuracy and macro-F1, scikit-learn's ``f1_score(average="macro")``: the unweighted
  mean of each label's F1 over the labels that occur in the gold labels or the predictions, a
  label's precision/recall/F1 being 0 where undefined (its ``zero_division`` default).
- token-cls: entity-level precision, recall and F1 as seqeval defines them by default
  (``seqeval.metrics.f1_score`` etc., conlleval's chunking): an entity counts when its type and
  word span both match exactly; micro-averaged over all entities, and per type.
  ``tests/test_classify.py`` checks both against the real packages on hand-made cases.
"""

from __future__ import annotations

from collections import defaultdict


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def label_scores(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    """``{"accuracy", "macro_f1", "per_label": {name: {precision, recall, f1, support}}}``."""
    if len(gold) != len(pred):
        raise ValueError("gold and predicted labels differ in length")
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    per_label = {}
    for k in sorted(set(gold) | set(pred)):
        tp = sum(g == k and p == k for g, p in zip(gold, pred, strict=True))
        precision, recall = _ratio(tp, pred.count(k)), _ratio(tp, gold.count(k))
        per_label[labels[k]] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": gold.count(k),
        }
    macro = sum(s["f1"] for s in per_label.values()) / len(per_label) if per_label else 0.0
    return {"accuracy": _ratio(correct, len(gold)), "macro_f1": macro, "per_label": per_label}


def _split_tag(tag: str) -> tuple[str, str]:
    # seqeval (prefix mode): the first character is the chunk tag, the rest after '-' the type.
    return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence as ``(type, first word, last word)``, seqeval's
    ``get_entities`` (B/I/E/S prefixes; an I- without B- starts an entity, as in conlleval)."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        kind, type_ = _split_tag(tag)
        if _chunk_ends(prev_tag, kind, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, kind, prev_type, type_):
            begin = i
        prev_tag, prev_type = kind, type_
    return chunks


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """``{"precision", "recall", "f1", "per_type": {type: {precision, recall, f1, support}}}`` over
    sentences of word tags (micro average: every entity counts once)."""
    if len(gold) != len(pred) or any(len(g) != len(p) for g, p in zip(gold, pred, strict=True)):
        raise ValueError("gold and predicted tag sequences differ in length")
    true, found = defaultdict(set), defaultdict(set)
    for n, (g, p) in enumerate(zip(gold, pred, strict=True)):
        for kind, start, end in entities(g):
            true[kind].add((n, start, end))
        for kind, start, end in entities(p):
            found[kind].add((n, start, end))
    per_type = {}
    for kind in sorted(set(true) | set(found)):
        tp = len(true[kind] & found[kind])
        precision, recall = _ratio(tp, len(found[kind])), _ratio(tp, len(true[kind]))
        per_type[kind] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": len(true[kind]),
        }
    tp = sum(len(true[k] & found[k]) for k in per_type)
    precision = _ratio(tp, sum(len(v) for v in found.values()))
    recall = _ratio(tp, sum(len(v) for v in true.values()))
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "per_type": per_type}
