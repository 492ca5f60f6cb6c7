"""Tokenizer for a device bundle: ``tokenizers`` + jinja2 only, behaving like transformers.

The bundle's ``tokenizer.json`` is what ``PreTrainedTokenizerFast`` wraps, and its chat template is
rendered the way ``apply_chat_template(tokenize=False)`` renders it, so samples tokenized on the
device match what the same data would give on the host.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from edgeft.errors import EdgeftError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# transformers >= 4.4x saves the template beside the config instead of inside it.
TEMPLATE_FILE = "chat_template.jinja"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_str(value: Any, where: str, name: str) -> str | None:
    """HF stores special tokens as a string or as a serialized AddedToken ``{"content": ...}``."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise EdgeftError(f"{where}: {name} must be a string or an object with a 'content' string")
    return value


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return {}  # a bare tokenizer.json is usable: no special tokens, no template
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise EdgeftError(f"{path}: expected a JSON object")
    return config


def _read_template(directory: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):
        # Older HF format: a list of named templates; apply_chat_template uses "default".
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and (directory / TEMPLATE_FILE).is_file():
        template = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if template is not None and not isinstance(template, str):
        raise EdgeftError(f"{directory / CONFIG_FILE}: chat_template must be a string")
    return template


def _raise_exception(message: str) -> None:
    raise EdgeftError(f"chat template error: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Same override as transformers: jinja's own tojson HTML-escapes, which changes the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in the same environment transformers uses for chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise EdgeftError(f"chat_template: syntax error on template line {e.lineno}: {e.message}") from None


class BundleTokenizer:
    """The bundle's tokenizer: encode/decode text and render chats into prompt strings."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: dict[str, Any],
        chat_template: str | None,
        source: str = CONFIG_FILE,
    ) -> None:
        self._tok = tokenizer
        # transformers turns off any truncation/padding stored in tokenizer.json unless asked for
        # it; doing the same keeps ids identical and never silently drops tokens.
        self._tok.no_truncation()
        self._tok.no_padding()
        specials = {n: _token_str(config.get(n), source, n) for n in _SPECIAL_NAMES}
        self.bos_token = specials["bos_token"]
        self.eos_token = specials["eos_token"]
        self.unk_token = specials["unk_token"]
        self.pad_token = specials["pad_token"] or self.eos_token
        self.bos_token_id = self._token_id(self.bos_token, source, "bos_token")
        self.eos_token_id = self._token_id(self.eos_token, source, "eos_token")
        self.pad_token_id = self._token_id(self.pad_token, source, "pad_token")
        # Template variables are only the tokens the config sets, as in HF's special_tokens_map:
        # an unset token is undefined in the template, not the string "None".
        self._template_vars = {n: v for n, v in specials.items() if v}
        extra = config.get("additional_special_tokens")
        if isinstance(extra, list) and extra:
            self._template_vars["additional_special_tokens"] = [
                _token_str(t, source, "additional_special_tokens") for t in extra
            ]
        self.chat_template = chat_template
        self._compiled: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> BundleTokenizer:
        directory = Path(path)
        tok_path = directory / TOKENIZER_FILE
        if not tok_path.is_file():
            raise EdgeftError(f"{tok_path}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exception on bad files
            raise EdgeftError(f"{tok_path}: cannot load tokenizer ({e})") from None
        config = _read_config(directory)
        return cls(tokenizer, config, _read_template(directory, config), str(directory / CONFIG_FILE))

    def _token_id(self, token: str | None, source: str, name: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise EdgeftError(f"{source}: {name} {token!r} is not in {TOKENIZER_FILE}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's ``[start, end)`` character span in ``text``."""
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_words(self, words: list[str]) -> tuple[list[int], list[int | None]]:
        """Ids of text already split into words, and each token's word index (None for special
        tokens): transformers' ``tokenizer(words, is_split_into_words=True)`` and ``word_ids()``."""
        enc = self._tok.encode(words, is_pretokenized=True, add_special_tokens=True)
        return enc.ids, list(enc.word_ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """Render ``messages`` with the bundle's chat template, as ``apply_chat_template`` does."""
        if self.chat_template is None:
            raise EdgeftError(
                f"tokenizer has no chat_template (looked in {CONFIG_FILE} and "
                f"{TEMPLATE_FILE}); use 'text' or 'prompt'/'completion' samples"
            )
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        try:
            # tools/documents are passed as None like transformers, so `is defined` tests agree.
            return self._compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._template_vars,
            )
        except jinja2.TemplateError as e:
            raise EdgeftError(f"chat_template: {e}") from None
