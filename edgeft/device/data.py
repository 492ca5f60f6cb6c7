"""Training data on the device: JSON Lines samples -> token ids with loss labels -> padded batches.

Three sample formats, one JSON object per line:
  {"text": "..."}                                   loss on every token
  {"prompt": "...", "completion": "..."}            loss on the completion (and its eos)
  {"messages": [{"role": ..., "content": ...}]}     loss on the assistant turns
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from edgeft.device.tokenizer import BundleTokenizer
from edgeft.errors import EdgeftError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ACCEPTED = "'text', 'prompt' + 'completion', or 'messages'"
# Batches are length-sorted within windows of this many batches: padding stays low while the
# order is still shuffled across the whole data set.
SORT_WINDOW_BATCHES = 50


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss; same length as input_ids
    line: int  # 1-based line in the source file


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [B, L], right-padded with pad_token_id
    attention_mask: np.ndarray  # int64 [B, L], 1 = real token
    labels: np.ndarray  # int64 [B, L], IGNORE_INDEX on padding and non-loss tokens ([B] for seq-cls)
    # causal-lm: labels[:, 1:] != IGNORE_INDEX (the graph shifts labels by one); classification
    # (edgeft.device.labelled): the labelled texts or tokens
    num_loss_tokens: int
    num_tokens: int  # attention_mask.sum()


class _SampleError(Exception):
    """A problem with one sample; the caller adds the ``path:line:`` prefix."""


# ---------------------------------------------------------------------------------------------
# Reading the file


def _open(path: str) -> BinaryIO:
    try:
        # Binary: a bad byte is then reported on its line instead of failing the whole read;
        # the caller closes the file with `with`.
        return open(path, "rb")
    except FileNotFoundError:
        raise EdgeftError(f"{path}: data file not found") from None
    except OSError as e:
        raise EdgeftError(f"{path}: cannot open data file ({e.strerror})") from None


def _iter_records(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_json)`` for each non-blank line, streaming the file."""
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM, as some editors write
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EdgeftError(f"{path}:{number}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgeftError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            except RecursionError:
                raise EdgeftError(f"{path}:{number}: invalid JSON (nested too deeply)") from None
            yield number, record


def _require_str(record: dict[str, Any], key: str, allow_empty: bool = True) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _SampleError(f"'{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise _SampleError(f"'{key}' is empty")
    _check_encodable(value, f"'{key}'")
    return value


def _check_encodable(value: str, what: str) -> None:
    # JSON may carry lone surrogate escapes ("\ud800") that are valid JSON but not text.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _SampleError(f"{what} contains an unpaired surrogate escape") from None


# ---------------------------------------------------------------------------------------------
# The three formats


def _with_eos(ids: list[int], tokenizer: BundleTokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise _SampleError("the tokenizer has no eos_token, which 'text' and 'completion' samples need to end with")
    return ids if ids and ids[-1] == eos else ids + [eos]


def _text_sample(record: dict[str, Any], tokenizer: BundleTokenizer) -> tuple[list[int], list[int]]:
    ids = _with_eos(tokenizer.encode(_require_str(record, "text", allow_empty=False)), tokenizer)
    return ids, list(ids)


def _prompt_sample(record: dict[str, Any], tokenizer: BundleTokenizer) -> tuple[list[int], list[int]]:
    prompt = tokenizer.encode(_require_str(record, "prompt"))
    # The post-processor (bos) belongs at the start of the sequence only, not before the completion.
    completion = tokenizer.encode(_require_str(record, "completion", allow_empty=False), add_special_tokens=False)
    completion = _with_eos(completion, tokenizer)
    return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _SampleError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _SampleError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _SampleError(f"messages[{i}] has role {m['role']!r}; allowed roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise _SampleError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        _check_encodable(m["content"], f"messages[{i}].content")
        if m["role"] == "assistant" and not m["content"]:
            raise _SampleError(f"messages[{i}] is an assistant message with empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise _SampleError("'messages' has no assistant message, so nothing to learn from")


def _assistant_spans(
    messages: list[dict[str, Any]], rendered: str, tokenizer: BundleTokenizer
) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in ``rendered``.

    A turn starts where the generation prompt before it ends and stops where the conversation up
    to and including it ends; both renderings must be prefixes of the full one, or the spans would
    point at the wrong text.
    """
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        through = tokenizer.render_chat(messages[: i + 1])
        if not (rendered.startswith(before) and rendered.startswith(through)):
            raise _SampleError(
                f"the chat template is not prefix-consistent at messages[{i}] "
                "(rendering the conversation up to this turn does not give a "
                "prefix of the full rendering), so assistant tokens cannot be found"
            )
        spans.append((len(before), len(through)))
    return spans


def _chat_sample(record: dict[str, Any], tokenizer: BundleTokenizer) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    _check_messages(messages)
    rendered = tokenizer.render_chat(messages)
    spans = _assistant_spans(messages, rendered, tokenizer)
    # The template writes its own bos (if any), so the post-processor must not add another.
    ids, offsets = tokenizer.encode_with_offsets(rendered, add_special_tokens=False)
    labels = [
        tid if any(start < e and s < end for s, e in spans) else IGNORE_INDEX for tid, (start, end) in zip(ids, offsets)
    ]
    return ids, labels


def _encode_record(record: Any, tokenizer: BundleTokenizer) -> tuple[list[int], list[int]]:
    if not isinstance(record, dict):
        raise _SampleError(f"expected a JSON object, got {type(record).__name__}")
    formats = [k for k in ("text", "prompt", "messages") if k in record]
    if "completion" in record and "prompt" not in record:
        raise _SampleError("has 'completion' but no 'prompt'")
    if len(formats) > 1:
        raise _SampleError(f"mixes {' and '.join(repr(k) for k in formats)}; use one of {ACCEPTED}")
    if not formats:
        raise _SampleError(
            f"no recognised keys (got {', '.join(map(repr, record)) or 'none'}); a sample needs {ACCEPTED}"
        )
    if formats[0] == "text":
        return _text_sample(record, tokenizer)
    if formats[0] == "prompt":
        if "completion" not in record:
            raise _SampleError("has 'prompt' but no 'completion'")
        return _prompt_sample(record, tokenizer)
    return _chat_sample(record, tokenizer)


# ---------------------------------------------------------------------------------------------
# Public API


def _count_loss(labels: list[int]) -> int:
    # Position 0 is never a target: the graph predicts token t+1 from position t.
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


def _fit_length(ids: list[int], labels: list[int], max_seq_len: int, truncate: bool) -> tuple[list[int], list[int]]:
    if len(ids) <= max_seq_len:
        return ids, labels
    if not truncate:
        raise _SampleError(
            f"sample is {len(ids)} tokens, longer than the limit of {max_seq_len}; "
            "raise --max-seq-len or pass --truncate to cut long samples"
        )
    return ids[:max_seq_len], labels[:max_seq_len]


def load_examples(
    path: str | os.PathLike, tokenizer: BundleTokenizer, max_seq_len: int, truncate: bool = False
) -> list[Example]:
    """Read a JSON Lines file into tokenized examples; any bad line is an EdgeftError."""
    path = os.fspath(path)
    examples = []
    for number, record in _iter_records(path):
        try:
            ids, labels = _encode_record(record, tokenizer)
            ids, labels = _fit_length(ids, labels, max_seq_len, truncate)
            if _count_loss(labels) == 0:
                cut = " after truncation to --max-seq-len" if truncate else ""
                raise _SampleError(f"sample has no tokens to learn from{cut}")
        except (_SampleError, EdgeftError) as e:
            raise EdgeftError(f"{path}:{number}: {e}") from None
        examples.append(Example(input_ids=ids, labels=labels, line=number))
    if not examples:
        raise EdgeftError(f"{path}: no examples")
    return examples


def _pad(group: list[Example], pad_token_id: int) -> Batch:
    length = max(len(ex.input_ids) for ex in group)
    input_ids = np.full((len(group), length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(group), length), dtype=np.int64)
    labels = np.full((len(group), length), IGNORE_INDEX, dtype=np.int64)
    for row, ex in enumerate(group):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        attention_mask[row, :n] = 1
        labels[row, :n] = ex.labels
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        num_loss_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
        num_tokens=int(attention_mask.sum()),
    )


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Index groups for one epoch: shuffled, length-sorted within windows, batches shuffled."""
    if batch_size < 1:
        raise EdgeftError(f"batch size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lens = np.asarray(lengths, dtype=np.int64)
    window = batch_size * SORT_WINDOW_BATCHES
    groups = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]  # stable: deterministic ties
        groups.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [groups[i] for i in rng.permutation(len(groups))]


def make_batches(
    examples: list[Example],
    batch_size: int,
    pad_token_id: int,
    seed: int,
    epoch: int,
    collate: Callable[[list[Example], int], Batch] = _pad,
) -> list[Batch]:
    """All batches of one epoch, in training order; the same arguments give the same batches.
    ``collate`` pads a group into a Batch (classification bundles: ``edgeft.device.labelled``)."""
    groups = batch_order([len(ex.input_ids) for ex in examples], batch_size, seed, epoch)
    return [collate([examples[i] for i in group], pad_token_id) for group in groups]
