"""Tests for edgeft.device.tokenizer and edgeft.device.data, on a tokenizer trained in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from edgeft.device.data import IGNORE_INDEX, Example, load_examples, make_batches
from edgeft.device.tokenizer import BundleTokenizer
from edgeft.errors import EdgeftError

CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Exercises what differs between plain jinja2 and transformers' environment: trim_blocks,
# lstrip_blocks, loop controls, the non-escaping tojson, and the special-token variables.
FANCY = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% continue %}
    {% endif %}
[{{ m['role'] | upper }}] {{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}
{% if pad_token is defined %}pad={{ pad_token }}{% endif %}"""
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "hello world, hello device, hello adapter",
    "What is the capital of France? Paris is the capital of France.",
] * 4
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


def _write_bundle(directory: Path, template: str = CHATML, with_pad: bool = True) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "chat_template": template,
    }
    if with_pad:
        config["pad_token"] = "<pad>"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def tok(bundle: Path) -> BundleTokenizer:
    return BundleTokenizer.from_dir(bundle)


@pytest.fixture(scope="module")
def hf_tok(bundle: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(bundle / "tokenizer.json"))


def _jsonl(tmp_path: Path, *records, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _labelled_text(tok: BundleTokenizer, ex: Example) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX], skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_special_tokens(tok: BundleTokenizer, tmp_path: Path) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    no_pad = BundleTokenizer.from_dir(_write_bundle(tmp_path / "b", with_pad=False))
    assert (no_pad.pad_token, no_pad.pad_token_id) == ("</s>", 1)


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "  The quick brown fox\n\tjumps!",
        "Ünïcödé 🦊 ok",
        "<|im_start|>user\nhi<|im_end|>",
        "",
    ],
)
def test_encode_matches_transformers(tok: BundleTokenizer, hf_tok, text: str) -> None:
    assert tok.encode(text) == hf_tok(text)["input_ids"]
    assert tok.encode(text, add_special_tokens=False) == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.encode(text)[:1] == [tok.bos_token_id]  # the post-processor really ran


def test_encode_with_offsets_and_decode(tok: BundleTokenizer) -> None:
    text = "hello Ünïcödé world"
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    # Char offsets, not byte offsets; the bytes of one char split over tokens share its span.
    spans = [o for i, o in enumerate(offsets) if i == 0 or o != offsets[i - 1]]
    assert "".join(text[s:e] for s, e in spans) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<s>" + text


@pytest.mark.parametrize("template", [CHATML, FANCY], ids=["chatml", "fancy"])
@pytest.mark.parametrize("gen", [False, True])
def test_render_chat_matches_transformers(tmp_path: Path, template: str, gen: bool) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _write_bundle(tmp_path / "b", template=template)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=template,
    )
    ours = BundleTokenizer.from_dir(directory).render_chat(CHAT, add_generation_prompt=gen)
    assert ours == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert "Rome, of course." in ours


def test_render_chat_errors(tmp_path: Path) -> None:
    raising = "{{ raise_exception('only ' + 'user turns') }}"
    tok = BundleTokenizer.from_dir(_write_bundle(tmp_path / "r", template=raising))
    with pytest.raises(EdgeftError, match="only user turns"):
        tok.render_chat(CHAT)
    directory = _write_bundle(tmp_path / "n")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(EdgeftError, match="has no chat_template"):
        BundleTokenizer.from_dir(directory).render_chat(CHAT)


def test_missing_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(EdgeftError, match=r"nowhere[/\\]tokenizer\.json"):
        BundleTokenizer.from_dir(tmp_path / "nowhere")


def test_device_modules_do_not_import_host_libraries() -> None:
    code = (
        "import sys, edgeft.device.data, edgeft.device.tokenizer; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'optimum') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Labels per format


def test_text_labels(tok: BundleTokenizer, tmp_path: Path) -> None:
    path = _jsonl(tmp_path, {"text": "hello world"}, "", "   ", {"text": "bye</s>"})
    first, second = load_examples(path, tok, max_seq_len=64)
    assert first.input_ids == tok.encode("hello world") + [tok.eos_token_id]
    assert first.labels == first.input_ids
    assert (first.line, second.line) == (1, 4)  # blank lines skipped, numbering kept
    assert second.input_ids == tok.encode("bye</s>")  # already ends with eos: not doubled
    assert second.input_ids.count(tok.eos_token_id) == 1


def test_prompt_completion_labels(tok: BundleTokenizer, tmp_path: Path) -> None:
    path = _jsonl(tmp_path, {"prompt": "What is the capital?", "completion": " Paris."})
    (ex,) = load_examples(path, tok, max_seq_len=64)
    p = tok.encode("What is the capital?")
    c = tok.encode(" Paris.", add_special_tokens=False) + [tok.eos_token_id]
    assert ex.input_ids == p + c
    assert ex.labels == [IGNORE_INDEX] * len(p) + c
    assert ex.input_ids.count(tok.bos_token_id) == 1  # no bos before the completion


def test_chat_labels_cover_assistant_turns_only(tok: BundleTokenizer, tmp_path: Path) -> None:
    (ex,) = load_examples(_jsonl(tmp_path, {"messages": CHAT}), tok, max_seq_len=256)
    rendered = tok.render_chat(CHAT)
    assert ex.input_ids == tok.encode(rendered, add_special_tokens=False)
    assert ex.input_ids[0] != tok.bos_token_id  # the template has no bos; none added either
    assert len(ex.labels) == len(ex.input_ids)
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(ex.labels, ex.input_ids))
    # Each assistant turn is labelled from its content through its <|im_end|> (and the newline
    # the template writes after it); headers, system and user turns are not.
    assert _labelled_text(tok, ex) == "Paris.<|im_end|>\nRome, of course.<|im_end|>\n"
    labelled = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert "Paris." in labelled and "Rome, of course." in labelled
    assert "France" not in labelled and "Italy" not in labelled and "terse" not in labelled
    im_start = tok.encode("<|im_start|>", add_special_tokens=False)[0]
    assert im_start not in [t for t in ex.labels if t != IGNORE_INDEX]


def test_chat_trailing_user_turn_is_not_labelled(tok: BundleTokenizer, tmp_path: Path) -> None:
    chat = CHAT[1:3] + [{"role": "user", "content": "Thanks!"}]
    (ex,) = load_examples(_jsonl(tmp_path, {"messages": chat}), tok, max_seq_len=256)
    assert _labelled_text(tok, ex) == "Paris.<|im_end|>\n"


def test_truncate_cuts_to_limit(tok: BundleTokenizer, tmp_path: Path) -> None:
    path = _jsonl(tmp_path, {"text": "The quick brown fox jumps over the lazy dog."})
    full = load_examples(path, tok, max_seq_len=1000)[0]
    (ex,) = load_examples(path, tok, max_seq_len=5, truncate=True)
    assert ex.input_ids == full.input_ids[:5] and ex.labels == full.labels[:5]


# ---------------------------------------------------------------------------------------------
# Batches


def _examples(lengths: list[int], loss_from: int = 0) -> list[Example]:
    return [
        Example(
            input_ids=[10 + i] * n,
            labels=[IGNORE_INDEX] * loss_from + [7] * (n - loss_from),
            line=i + 1,
        )
        for i, n in enumerate(lengths)
    ]


def test_batch_padding_and_counts() -> None:
    examples = _examples([3, 5], loss_from=1)
    (batch,) = make_batches(examples, batch_size=2, pad_token_id=2, seed=0, epoch=0)
    assert batch.input_ids.dtype == batch.attention_mask.dtype == batch.labels.dtype == np.int64
    rows = {int(batch.attention_mask[r].sum()): r for r in range(2)}
    short = rows[3]
    assert batch.input_ids[short].tolist() == [10, 10, 10, 2, 2]
    assert batch.attention_mask[short].tolist() == [1, 1, 1, 0, 0]
    assert batch.labels[short].tolist() == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert np.all(batch.labels[batch.attention_mask == 0] == IGNORE_INDEX)
    assert batch.num_tokens == 8
    assert batch.num_loss_tokens == 2 + 4


def test_num_loss_tokens_ignores_position_zero() -> None:
    (batch,) = make_batches(_examples([4]), batch_size=1, pad_token_id=0, seed=0, epoch=0)
    assert batch.labels[0, 0] == 7  # labelled, but nothing predicts position 0
    assert batch.num_loss_tokens == 3


def test_make_batches_deterministic_sorted_and_complete() -> None:
    rng = np.random.default_rng(123)
    lengths = rng.integers(1, 60, size=437).tolist()
    examples = _examples(lengths)
    first = make_batches(examples, batch_size=4, pad_token_id=0, seed=7, epoch=3)
    again = make_batches(examples, batch_size=4, pad_token_id=0, seed=7, epoch=3)
    other = make_batches(examples, batch_size=4, pad_token_id=0, seed=7, epoch=4)
    assert len(first) == len(again) == -(-437 // 4)
    for a, b in zip(first, again):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert [b.input_ids[:, 0].tolist() for b in first] != [b.input_ids[:, 0].tolist() for b in other]
    # Every example exactly once (ids encode the example index).
    seen = sorted(int(t) - 10 for b in first for t in b.input_ids[:, 0])
    assert seen == list(range(437))
    assert min(b.input_ids.shape[0] for b in first) == 437 % 4  # last partial batch kept
    # Batch order is shuffled too, not one ascending sweep through each window.
    longest = [int(b.attention_mask.sum(axis=1).max()) for b in first[:50]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    mean_padding = np.mean([1 - b.attention_mask.mean() for b in first])
    assert mean_padding < 0.1  # unsorted batches of random lengths would pad ~30%


def test_make_batches_sorted_within_window() -> None:
    # One window (<= batch_size * 50 examples): batches partition the sorted lengths.
    lengths = list(range(40, 0, -1))
    batches = make_batches(_examples(lengths), batch_size=8, pad_token_id=0, seed=1, epoch=0)
    bands = sorted(sorted(b.attention_mask.sum(axis=1).tolist()) for b in batches)
    assert bands == [list(range(s, s + 8)) for s in range(1, 41, 8)]


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "a" "b"}'], r":2: invalid JSON \(Expecting ',' delimiter\)"),
        (['["text"]'], r":1: expected a JSON object, got list"),
        (
            ['{"txt": "x", "id": 3}'],
            (
                r":1: no recognised keys \(got 'txt', 'id'\); a sample needs 'text', "
                r"'prompt' \+ 'completion', or 'messages'"
            ),
        ),
        (['{"text": 5}'], r":1: 'text' must be a string, got int"),
        (['{"text": ""}'], r":1: 'text' is empty"),
        (['{"prompt": "q"}'], r":1: has 'prompt' but no 'completion'"),
        (['{"completion": "a"}'], r":1: has 'completion' but no 'prompt'"),
        (['{"prompt": "q", "completion": ""}'], r":1: 'completion' is empty"),
        (['{"prompt": "q", "completion": ["a"]}'], r":1: 'completion' must be a string, got list"),
        (['{"text": "t", "messages": []}'], r":1: mixes 'text' and 'messages'"),
        (['{"messages": "hi"}'], r":1: 'messages' must be a non-empty list"),
        (
            ['{"messages": [{"role": "tool", "content": "x"}]}'],
            r":1: messages\[0\] has role 'tool'; allowed roles are system, user, assistant",
        ),
        (
            ['{"messages": [{"role": "user", "content": 3}]}'],
            r":1: messages\[0\].content must be a string",
        ),
        (['{"messages": [{"role": "user"}]}'], r":1: messages\[0\] must be an object with 'role'"),
        (
            [json.dumps({"messages": [CHAT[1], {"role": "assistant", "content": ""}]})],
            r":1: messages\[1\] is an assistant message with empty content",
        ),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], r":1: 'messages' has no assistant"),
        (
            [
                '{"text": "ok"}',
                "",
                '{"prompt": "The quick brown fox jumps over", "completion": "x"}',
            ],
            (
                r":3: sample is \d+ tokens, longer than the limit of 8; "
                r"raise --max-seq-len or pass --truncate"
            ),
        ),
    ],
)
def test_bad_lines(tok: BundleTokenizer, tmp_path: Path, lines: list[str], message: str) -> None:
    path = _jsonl(tmp_path, *lines)
    with pytest.raises(EdgeftError, match="^" + re.escape(str(path)) + message):
        load_examples(path, tok, max_seq_len=8)


def test_zero_loss_tokens(tok: BundleTokenizer, tmp_path: Path) -> None:
    long_prompt = {"prompt": "The quick brown fox jumps over the lazy dog.", "completion": " x"}
    path = _jsonl(tmp_path, long_prompt)
    with pytest.raises(EdgeftError, match=r":1: sample has no tokens to learn from after trunc"):
        load_examples(path, tok, max_seq_len=4, truncate=True)


def test_invalid_utf8(tok: BundleTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(EdgeftError, match=r"data\.jsonl:2: not valid UTF-8"):
        load_examples(path, tok, max_seq_len=64)


def test_missing_and_empty_files(tok: BundleTokenizer, tmp_path: Path) -> None:
    with pytest.raises(EdgeftError, match=r"absent\.jsonl: data file not found"):
        load_examples(tmp_path / "absent.jsonl", tok, max_seq_len=64)
    empty = _jsonl(tmp_path, "", "  ", name="empty.jsonl")
    with pytest.raises(EdgeftError, match=r"empty\.jsonl: no examples$"):
        load_examples(empty, tok, max_seq_len=64)


def test_chat_errors_carry_line(tmp_path: Path) -> None:
    # A template that drops earlier assistant turns (as some "thinking" templates do) cannot be
    # split into turns by prefix rendering.
    forgetful = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok = BundleTokenizer.from_dir(_write_bundle(tmp_path / "f", template=forgetful))
    path = _jsonl(tmp_path, {"messages": CHAT[1:3]}, {"messages": CHAT})
    with pytest.raises(EdgeftError, match=r"data\.jsonl:2: the chat template is not prefix-consistent"):
        load_examples(path, tok, max_seq_len=256)
    raising = BundleTokenizer.from_dir(_write_bundle(tmp_path / "r", template="{{ raise_exception('no') }}"))
    with pytest.raises(EdgeftError, match=r"data\.jsonl:1: chat template error: no"):
        load_examples(path, raising, max_seq_len=256)
