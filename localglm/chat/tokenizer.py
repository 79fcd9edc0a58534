"""The checkpoint's tokenizer: tokenizer.json through the Rust `tokenizers` library, plus its chat template.

We load the same three files transformers 5 reads (tokenizer.json, tokenizer_config.json,
chat_template.jinja, which wins over the config's template) and give the same ids and the same
rendered prompt, without importing transformers. GLM templates write `[gMASK]<sop>` as text, so
`encode` never adds a BOS: the special tokens in the text become their single ids.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from .template import BUILTIN_TEMPLATES, ChatTemplate, builtin_template, detect_format, parse_string_tool_arguments
from ..errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"

# Named special-token attributes transformers passes to chat templates (SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end an assistant turn in GLM chats (generation_config.json lists these as eos ids).
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


class Tokenizer:
    """A GLM checkpoint's tokenizer and chat template(s)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        config: Mapping[str, Any] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        source: str = "tokenizer",
    ) -> None:
        """Wrap a loaded `tokenizers.Tokenizer`; `chat_templates` maps names ("default", "tool_use") to sources."""
        self._backend = backend
        self._config = dict(config or {})
        self._template_sources = dict(chat_templates or {})
        self._compiled: dict[str, ChatTemplate] = {}
        self.source = source
        self.is_byte_level = self._uses_byte_level_decoder(backend)

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, chat_template: str | None = None) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and chat_template.jinja from a checkpoint folder.

        `chat_template` overrides the checkpoint's template: Jinja source, or "glm45"/"glm47" for a
        template shipped with localglm (for checkpoints that ship none).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise TokenizerError(f"{folder}: not a directory")
        tokenizer_path = folder / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise TokenizerError(f"{tokenizer_path}: missing (the checkpoint's tokenizer is required)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust loader raises plain Exception for every kind of corruption
            raise TokenizerError(f"{tokenizer_path}: cannot load ({' '.join(str(exc).split())[:200]})") from None

        config: dict[str, Any] = {}
        config_path = folder / CONFIG_FILE
        if config_path.is_file():
            loaded = _read_json(config_path)
            if not isinstance(loaded, dict):
                raise TokenizerError(f"{config_path}: expected a JSON object")
            config = loaded

        templates = cls._templates_from_config(config, config_path)
        # As in transformers 5, separate template files take priority over the config's entries.
        template_file = folder / TEMPLATE_FILE
        file_templates: dict[str, str] = {}
        if template_file.is_file():
            file_templates["default"] = cls._read_text(template_file)
        template_dir = folder / TEMPLATE_DIR
        if template_dir.is_dir():
            for extra in sorted(template_dir.glob("*.jinja")):
                file_templates[extra.stem] = cls._read_text(extra)
        if file_templates:
            templates = file_templates
        if chat_template is not None:
            builtin = chat_template in BUILTIN_TEMPLATES
            templates = {"default": builtin_template(chat_template) if builtin else chat_template}
            return cls(backend, config=config, chat_templates=templates, source=f"{folder} (override template)")
        return cls(backend, config=config, chat_templates=templates, source=str(folder))

    def save(self, folder: str | Path) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and the chat template(s) (chat_template.jinja,
        additional_chat_templates/NAME.jinja) into `folder`, so that `from_dir(folder)` gives this tokenizer back."""
        folder = Path(folder)
        written = [folder / TOKENIZER_FILE, folder / CONFIG_FILE]
        try:
            self._backend.save(str(written[0]), pretty=True)
            config = {k: v for k, v in self._config.items() if k != "chat_template"}  # the template files say it
            written[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            for name, text in self._template_sources.items():
                if not name or name.startswith(".") or any(c in name for c in "/\\:"):
                    raise TokenizerError(f"{self.source}: chat template name {name!r} cannot be a file name")
                path = folder / TEMPLATE_FILE if name == "default" else folder / TEMPLATE_DIR / f"{name}.jinja"
                path.parent.mkdir(exist_ok=True)
                path.write_text(text, encoding="utf-8")
                written.append(path)
        except OSError as exc:
            raise TokenizerError(f"{folder}: cannot write the tokenizer ({exc.strerror or exc})") from None
        return written

    @staticmethod
    def _read_text(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: cannot read ({exc.__class__.__name__})") from None

    @staticmethod
    def _templates_from_config(config: Mapping[str, Any], config_path: Path) -> dict[str, str]:
        """The config's `chat_template`: one string, or a list of {"name", "template"} entries."""
        value = config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list):
            out = {}
            for entry in value:
                if not (
                    isinstance(entry, dict)
                    and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)
                ):
                    raise TokenizerError(f"{config_path}: chat_template list entries need string 'name' and 'template'")
                out[entry["name"]] = entry["template"]
            return out
        raise TokenizerError(f"{config_path}: chat_template must be a string or a list of named templates")

    @staticmethod
    def _uses_byte_level_decoder(backend: tokenizers.Tokenizer) -> bool:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        return decoder.get("type") == "ByteLevel"

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added (chat templates write those as text)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as transformers' `decode` gives it."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (vocabulary form), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string (vocabulary form) of one id, or None."""
        return self._backend.id_to_token(token_id)

    @cached_property
    def special_token_ids(self) -> dict[str, int]:
        """Every special added token, by its text (e.g. "<|user|>" -> 151336)."""
        return {t.content: i for i, t in sorted(self._backend.get_added_tokens_decoder().items()) if t.special}

    @cached_property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (`eos_token`, `pad_token`, ...) the config sets; what templates receive."""
        named: dict[str, str] = {}
        for key in NAMED_SPECIAL_TOKENS:
            text = _token_text(self._config.get(key))
            if text is not None:
                named[key] = text
        for key, value in self._config.items():
            # transformers also passes any other `*_token` string (or serialized AddedToken) entry.
            is_token = isinstance(value, str) or (isinstance(value, Mapping) and value.get("__type") == "AddedToken")
            if key.endswith("_token") and key not in named and is_token:
                named[key] = _token_text(value)
        for source_key in ("extra_special_tokens", "model_specific_special_tokens"):
            extra = self._config.get(source_key)
            if isinstance(extra, Mapping):
                named.update({k: t for k, v in extra.items() if (t := _token_text(v)) is not None})
        return named

    @cached_property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an assistant turn: the config's eos token and GLM's role/end tokens."""
        names = [self.special_tokens_map.get("eos_token"), *GLM_STOP_TOKENS]
        ids = [self.token_to_id(n) for n in names if n is not None]
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming decoder for generated ids."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """Source of the default chat template, or None when the checkpoint ships none."""
        if not self._template_sources:
            return None
        return self._template_sources.get("default", next(iter(self._template_sources.values())))

    def _template(self, tools: list | None, name: str | None = None) -> ChatTemplate:
        """Pick a template the way transformers' `get_chat_template` does, compiling it once."""
        sources = self._template_sources
        if not sources:
            raise TokenizerError(
                f"{self.source}: no chat template (expected {TEMPLATE_FILE} or 'chat_template' in {CONFIG_FILE})"
            )
        if name is None:
            if tools and "tool_use" in sources:
                name = "tool_use"
            elif "default" in sources:
                name = "default"
            else:
                raise TokenizerError(
                    f"{self.source}: several chat templates ({', '.join(sorted(sources))}) and none named 'default'"
                )
        if name not in sources:
            raise TokenizerError(f"{self.source}: no chat template named {name!r}")
        if name not in self._compiled:
            label = TEMPLATE_FILE if name == "default" else f"chat template {name!r}"
            self._compiled[name] = ChatTemplate(sources[name], name=f"{self.source}: {label}")
        return self._compiled[name]

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        *,
        template_name: str | None = None,
        **kw: Any,
    ) -> str:
        """Render the prompt text for `messages`, as transformers' `apply_chat_template(tokenize=False)`.

        Tool-call arguments given as JSON strings (OpenAI style) are parsed first, since GLM
        templates need objects. Extra keyword arguments become template variables.
        """
        template = self._template(tools, template_name)
        return template.render(
            parse_string_tool_arguments(list(messages)),
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            special_tokens=self.special_tokens_map,
            **kw,
        )

    @cached_property
    def format(self) -> str:
        """Chat format family: "glm47" (generation opens with <think>, calls without newlines) or "glm45"."""
        return detect_format(self._template(None))

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size})"


class IncrementalDecoder:
    """Token ids in, text deltas out; never emits half a character.

    Byte-level BPE splits a multi-byte UTF-8 character across tokens, so decoding token by token
    would print U+FFFD. For byte-level vocabularies we map each token to its raw bytes and let an
    incremental UTF-8 decoder hold back an unfinished character; for other decoders we re-decode a
    short window and hold back while it ends in U+FFFD. Concatenating all deltas (and `finish()`)
    gives exactly `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._special_ids = frozenset(tokenizer.special_token_ids.values())
        self._byte_cache: dict[int, bytes] = {}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Window state for non-byte-level decoders.
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token, as the ByteLevel decoder produces them."""
        cached = self._byte_cache.get(token_id)
        if cached is not None:
            return cached
        if self._skip_special and token_id in self._special_ids:
            raw = b""
        else:
            token = self._tokenizer.id_to_token(token_id)
            if token is None:
                raw = b""
            elif any(ch not in _UNICODE_TO_BYTE for ch in token):
                raw = token.encode("utf-8")  # what the ByteLevel decoder does with unmappable tokens
            else:
                raw = bytes(_UNICODE_TO_BYTE[ch] for ch in token)
        self._byte_cache[token_id] = raw
        return raw

    def feed(self, ids: int | Iterable[int]) -> str:
        """Decode newly generated id(s); returns the text that is now complete (maybe "")."""
        batch = [ids] if isinstance(ids, int) else list(ids)
        if self._tokenizer.is_byte_level:
            return self._utf8.decode(b"".join(self._token_bytes(i) for i in batch))
        self._ids.extend(batch)
        return self._window_delta(final=False)

    def finish(self) -> str:
        """Flush what is held back (an unfinished character becomes U+FFFD, as in a full decode)."""
        if self._tokenizer.is_byte_level:
            return self._utf8.decode(b"", final=True)
        return self._window_delta(final=True)

    def _window_delta(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], self._skip_special)
        full = decode(self._ids[self._prefix_offset :], self._skip_special)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""
