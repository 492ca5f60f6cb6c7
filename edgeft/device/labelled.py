"""Labelled data for classification bundles: JSON Lines -> token ids with class ids -> batches.

One JSON object per line, by the bundle's task:
  seq-cls    {"text": "...", "label": "name"}                one label per text
  token-cls  {"tokens": ["w1", ...], "tags": ["O", ...]}     one label per word

token-cls words are aligned to sub-words as transformers' token-classification recipes do
(``is_split_into_words`` + ``word_ids()``): each word's first sub-word carries its tag, the other
sub-words and the special tokens are ignored (-100). ``edgeft predict`` also takes samples without
labels, and for token-cls ``{"text": ...}``, split into words by :func:`split_words`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeft.device.data import (
    IGNORE_INDEX,
    Batch,
    Example,
    _iter_records,
    _pad,
    _require_str,
    _SampleError,
    load_examples,
)
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.errors import EdgeftError
from edgeft.tasks import CAUSAL_LM, SEQ_CLS, TOKEN_CLS, Task

# Words of free text for token-cls: runs of letters/digits, joined by an inner - . / or '
# ("AX-220", "3.5", "don't"); any other non-space character is a word of its own.
_WORD = re.compile(r"\w+(?:[-./']\w+)*|[^\w\s]")


@dataclass
class Word:
    text: str
    start: int  # character span in the sample's text (predict --text); 0, 0 for given tokens
    end: int


@dataclass
class Labelled(Example):
    """An example of a classification bundle. ``labels``: ``[class id]`` for seq-cls (-100 when
    unlabelled); per token for token-cls. ``first_tokens[i]``: position of word i's first
    sub-word (words cut by --truncate are dropped from ``words``)."""

    text: str | None = None
    words: list[Word] = field(default_factory=list)
    first_tokens: list[int] = field(default_factory=list)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """``text`` split into words for token-cls, each with its ``[start, end)`` character span."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def load_labelled(
    path: str | os.PathLike,
    tokenizer: BundleTokenizer,
    task: Task,
    max_seq_len: int,
    truncate: bool = False,
    require_labels: bool = True,
) -> list[Labelled]:
    """Read a JSON Lines file for a classification bundle; any bad line is an EdgeftError naming it."""
    path = os.fspath(path)
    examples = []
    for number, record in _iter_records(path):
        try:
            example = encode_record(record, tokenizer, task, max_seq_len, truncate, require_labels)
        except (_SampleError, EdgeftError) as e:
            raise EdgeftError(f"{path}:{number}: {e}") from None
        example.line = number
        examples.append(example)
    if not examples:
        raise EdgeftError(f"{path}: no examples")
    return examples


def encode_record(
    record: Any, tokenizer: BundleTokenizer, task: Task, max_seq_len: int, truncate: bool, require_labels: bool
) -> Labelled:
    """One sample (a parsed JSON object) -> a Labelled example; raises _SampleError."""
    if not isinstance(record, dict):
        raise _SampleError(f"expected a JSON object, got {type(record).__name__}")
    if task.type == SEQ_CLS:
        return _text_sample(record, tokenizer, task, max_seq_len, truncate, require_labels)
    if "text" in record and "tokens" not in record and not require_labels:
        text = _require_str(record, "text", allow_empty=False)
        return encode_words(tokenizer, [Word(*w) for w in split_words(text)], None, task, max_seq_len, truncate, text)
    return _words_sample(record, tokenizer, task, max_seq_len, truncate, require_labels)


def encode_text(tokenizer: BundleTokenizer, text: str, task: Task, max_seq_len: int, truncate: bool) -> Labelled:
    """An unlabelled text (``predict --text``, ``/v1/classify``); raises _SampleError."""
    if not text.strip():
        raise _SampleError("the text is empty")
    return encode_record({"text": text}, tokenizer, task, max_seq_len, truncate, require_labels=False)


def _label_id(task: Task, name: Any, where: str) -> int:
    if not isinstance(name, str):
        raise _SampleError(f"{where} must be a string, got {type(name).__name__}")
    try:
        return task.labels.index(name)
    except ValueError:
        raise _SampleError(f"{where} {name!r} is not one of the bundle's labels ({', '.join(task.labels)})") from None


def _text_sample(
    record: dict, tokenizer: BundleTokenizer, task: Task, max_seq_len: int, truncate: bool, require_labels: bool
) -> Labelled:
    if "text" not in record:
        raise _SampleError(
            f"no 'text' (got {', '.join(map(repr, record)) or 'none'}); a seq-cls sample is {{'text': ..., 'label': ...}}"
        )
    text = _require_str(record, "text", allow_empty=False)
    if not text.strip():
        raise _SampleError("'text' is only whitespace")
    if "label" in record:
        label = _label_id(task, record["label"], "'label'")
    elif require_labels:
        raise _SampleError("no 'label'; a seq-cls sample is {'text': ..., 'label': ...}")
    else:
        label = IGNORE_INDEX
    ids = _fit(tokenizer.encode(text), max_seq_len, truncate)
    return Labelled(input_ids=ids, labels=[label], line=0, text=text)


def _words_sample(
    record: dict, tokenizer: BundleTokenizer, task: Task, max_seq_len: int, truncate: bool, require_labels: bool
) -> Labelled:
    tokens = record.get("tokens")
    if tokens is None:
        raise _SampleError(
            f"no 'tokens' (got {', '.join(map(repr, record)) or 'none'}); "
            "a token-cls sample is {'tokens': [...], 'tags': [...]}"
        )
    if not isinstance(tokens, list) or not tokens:
        raise _SampleError("'tokens' must be a non-empty list of words")
    words = []
    for i, word in enumerate(tokens):
        if not isinstance(word, str) or not word.strip():
            raise _SampleError(f"tokens[{i}] must be a non-empty string, got {word!r}")
        _require_str({f"tokens[{i}]": word}, f"tokens[{i}]")
        words.append(Word(word, 0, 0))
    tags = record.get("tags")
    if tags is None and require_labels:
        raise _SampleError("no 'tags'; a token-cls sample is {'tokens': [...], 'tags': [...]}")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) != len(tokens):
            got = len(tags) if isinstance(tags, list) else type(tags).__name__
            raise _SampleError(f"'tags' must be a list as long as 'tokens' ({len(tokens)} words), got {got}")
        tags = [_label_id(task, t, f"tags[{i}]") for i, t in enumerate(tags)]
    return encode_words(tokenizer, words, tags, task, max_seq_len, truncate)


def encode_words(
    tokenizer: BundleTokenizer,
    words: list[Word],
    tags: list[int] | None,
    task: Task,
    max_seq_len: int,
    truncate: bool,
    text: str | None = None,
) -> Labelled:
    """Sub-word ids of ``words``, the first sub-word of each word labelled with its tag."""
    if not words:
        raise _SampleError("the text has no words")
    ids, word_ids = tokenizer.encode_words([w.text for w in words])
    first: dict[int, int] = {}
    for pos, w in enumerate(word_ids):
        if w is not None and w not in first:
            first[w] = pos
    missing = [i for i in range(len(words)) if i not in first]
    if missing:
        raise _SampleError(f"tokens[{missing[0]}] ({words[missing[0]].text!r}) gives no sub-word tokens")
    ids = _fit(ids, max_seq_len, truncate)
    kept = [i for i in range(len(words)) if first[i] < len(ids) - 1 or len(ids) == len(word_ids)]
    labels = [IGNORE_INDEX] * len(ids)
    for i in kept:
        labels[first[i]] = tags[i] if tags is not None else IGNORE_INDEX
    return Labelled(
        input_ids=ids,
        labels=labels,
        line=0,
        text=text,
        words=[words[i] for i in kept],
        first_tokens=[first[i] for i in kept],
    )


def _fit(ids: list[int], max_seq_len: int, truncate: bool) -> list[int]:
    """Over-long samples: an error, or with --truncate the first max-1 tokens and the last one (BERT's
    [SEP]; a decoder's pooled token)."""
    if len(ids) <= max_seq_len:
        return ids
    if not truncate:
        raise _SampleError(
            f"sample is {len(ids)} tokens, longer than the limit of {max_seq_len}; "
            "raise --max-seq-len or pass --truncate to cut long samples"
        )
    return ids[: max_seq_len - 1] + ids[-1:]


def examples_for(
    task: Task, path: str | os.PathLike, tokenizer: BundleTokenizer, max_seq_len: int, truncate: bool = False
) -> list[Example]:
    """Training/eval data of a bundle of any task: every sample labelled, or an error naming its line."""
    if task.type == CAUSAL_LM:
        return load_examples(path, tokenizer, max_seq_len, truncate=truncate)
    examples = load_labelled(path, tokenizer, task, max_seq_len, truncate)
    check_learnable(examples, path, truncate)
    return examples


def collate_for(task: Task) -> Callable[[list[Example], int], Batch]:
    """The batch maker of ``task``: causal-lm's shifted token labels; seq-cls labels ``[batch]``,
    token-cls ``[batch, seq]``."""
    if task.type == CAUSAL_LM:
        return _pad
    return _collate_rows if task.type == SEQ_CLS else _collate_tokens


def _pad_ids(group: list[Example], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(ex.input_ids) for ex in group)
    input_ids = np.full((len(group), length), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(group), length), dtype=np.int64)
    for row, ex in enumerate(group):
        input_ids[row, : len(ex.input_ids)] = ex.input_ids
        mask[row, : len(ex.input_ids)] = 1
    return input_ids, mask


def _collate_rows(group: list[Example], pad_token_id: int) -> Batch:
    input_ids, mask = _pad_ids(group, pad_token_id)
    labels = np.array([ex.labels[0] for ex in group], dtype=np.int64)
    return Batch(input_ids, mask, labels, int((labels != IGNORE_INDEX).sum()), int(mask.sum()))


def _collate_tokens(group: list[Example], pad_token_id: int) -> Batch:
    input_ids, mask = _pad_ids(group, pad_token_id)
    labels = np.full(input_ids.shape, IGNORE_INDEX, dtype=np.int64)
    for row, ex in enumerate(group):
        labels[row, : len(ex.labels)] = ex.labels
    return Batch(input_ids, mask, labels, int((labels != IGNORE_INDEX).sum()), int(mask.sum()))


def check_learnable(examples: list[Labelled], path: str | os.PathLike, truncate: bool) -> None:
    """Training data must label something in every sample (token-cls: a word left after --truncate)."""
    for ex in examples:
        if all(x == IGNORE_INDEX for x in ex.labels):
            cut = " after truncation to --max-seq-len" if truncate else ""
            raise EdgeftError(f"{os.fspath(path)}:{ex.line}: sample has no labelled word{cut}")


__all__ = [
    "Labelled",
    "Word",
    "TOKEN_CLS",
    "check_learnable",
    "collate_for",
    "encode_record",
    "examples_for",
    "encode_text",
    "load_labelled",
    "split_words",
]
