"""Tokenizer loading, ids identical to transformers', streaming decode, and the tiny GLM tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from localglm.errors import TokenizerError
from localglm.chat.tiny_tokenizer import GLM_SPECIAL_TOKENS, build_tiny_tokenizer
from localglm.chat.tokenizer import IncrementalDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

UNICODE_SAMPLES = [
    "plain ascii, with   spaces\tand\ttabs\n\nand newlines\r\n",
    "Zürich — naïve café, 21°C ± 0.5",
    "日本語のテキストと中文字符混合",
    "emoji 🤖🧠👩🏽‍💻 and flags 🇩🇪🇯🇵",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∮ E⋅da = Q,  n → ∞",
    "combining e\u0301 and zero\u200bwidth and \u00a0nbsp",
    "def f(x):\n    return {'k': [1, 2, 3]}  # code\n",
    "",
    " leading and trailing  ",
    "Ѐ Ё Ђ Ѓ Є — кириллица; ελληνικά; עברית; العربية",
]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for style in ("glm45", "glm47"):
        d = tmp_path_factory.mktemp(style)
        build_tiny_tokenizer(d, style=style)
        dirs[style] = d
    return dirs


@pytest.fixture(scope="module")
def tok(tok_dirs: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_dir(tok_dirs["glm45"])


@pytest.fixture(scope="module")
def hf_tok(tok_dirs: dict[str, Path]):
    return transformers.AutoTokenizer.from_pretrained(tok_dirs["glm45"])


# ---- the tiny tokenizer ------------------------------------------------------------------------


def test_tiny_tokenizer_special_ids_are_the_top_of_the_vocab(tmp_path: Path) -> None:
    ids = build_tiny_tokenizer(tmp_path, vocab_size=400)
    assert list(ids) == list(GLM_SPECIAL_TOKENS)
    assert list(ids.values()) == list(range(400 - 36, 400))
    assert ids["<|endoftext|>"] == 364
    assert ids["<|video|>"] == 399
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 400
    assert tok.special_token_ids == ids


def test_tiny_tokenizer_is_deterministic_and_complete(tmp_path: Path) -> None:
    build_tiny_tokenizer(tmp_path / "a")
    build_tiny_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]  # no temp files left behind
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>"
    assert config["do_lower_case"] is False
    assert "chat_template" not in config
    assert config["added_tokens_decoder"]["478"]["content"] == "[gMASK]"
    assert config["added_tokens_decoder"]["478"]["special"] is True


def test_tiny_tokenizer_styles_write_their_template(tok_dirs: dict[str, Path]) -> None:
    from localglm.chat.template import builtin_template

    for style, d in tok_dirs.items():
        assert (d / "chat_template.jinja").read_text() == builtin_template(style)
        assert Tokenizer.from_dir(d).format == style


def test_tiny_tokenizer_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="vocab_size 100"):
        build_tiny_tokenizer(tmp_path, vocab_size=100)
    with pytest.raises(TokenizerError, match="glm99"):
        build_tiny_tokenizer(tmp_path, style="glm99")


# ---- ids and text ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_unicode_round_trip_and_ids_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert hf_tok.decode(ids) == text


def test_special_tokens_in_text_become_single_ids(tok: Tokenizer) -> None:
    ids = tok.encode("[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>")
    sp = tok.special_token_ids
    assert ids[:3] == [sp["[gMASK]"], sp["<sop>"], sp["<|user|>"]]
    assert tok.encode("\n") == [198]  # byte-level "Ċ"
    assert ids[-5:] == [sp["/nothink"], sp["<|assistant|>"], 198, sp["<think>"], sp["</think>"]]
    assert tok.decode(ids, skip_special_tokens=True) == "\nhi\n"
    for token, idx in sp.items():
        assert tok.encode(token) == [idx]
        assert tok.id_to_token(idx) == token
        assert tok.token_to_id(token) == idx


def test_stop_tokens_and_named_special_tokens(tok: Tokenizer) -> None:
    sp = tok.special_token_ids
    assert tok.stop_token_ids == (sp["<|endoftext|>"], sp["<|user|>"], sp["<|observation|>"])
    assert tok.special_tokens_map == {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def test_rendered_prompt_ids_match_transformers(tok_dirs: dict[str, Path]) -> None:
    messages = [
        {"role": "system", "content": "Answer in German."},
        {"role": "user", "content": "Wie spät ist es in Zürich? 🕰️"},
        {"role": "assistant", "content": "Ich schaue nach.", "reasoning_content": "Tool nötig."},
        {"role": "user", "content": "Danke!"},
    ]
    for style, d in tok_dirs.items():
        ours = Tokenizer.from_dir(d)
        hf = transformers.AutoTokenizer.from_pretrained(d)
        for thinking in (None, False):
            extra = {} if thinking is None else {"enable_thinking": thinking}
            text = ours.apply_chat_template(messages, enable_thinking=thinking)
            hf_ids = hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **extra
            )
            assert ours.encode(text) == list(hf_ids), (style, thinking)
            assert ours.encode(text)[:2] == [ours.special_token_ids["[gMASK]"], ours.special_token_ids["<sop>"]]


# ---- streaming decode --------------------------------------------------------------------------


def _stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    deltas = [dec.feed(i) for i in ids]
    deltas.append(dec.finish())
    return deltas


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_incremental_decoder_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode("<|assistant|>" + text + "<|user|>")
    deltas = _stream(tok.incremental_decoder(), ids)
    assert "".join(deltas) == tok.decode(ids) == "<|assistant|>" + text + "<|user|>"
    assert not any("\ufffd" in d for d in deltas)
    skipped = _stream(tok.incremental_decoder(skip_special_tokens=True), ids)
    assert "".join(skipped) == tok.decode(ids, skip_special_tokens=True) == text


def test_incremental_decoder_holds_partial_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("🤖")
    assert len(ids) > 1  # the tiny vocab has no merge for this 4-byte character
    dec = tok.incremental_decoder()
    assert [dec.feed(i) for i in ids] == [""] * (len(ids) - 1) + ["🤖"]
    dec = tok.incremental_decoder()
    assert dec.feed(ids[:1]) == ""
    assert dec.finish() == "\ufffd"  # a cut-off character ends as the replacement character, like decode()


def test_incremental_decoder_matches_decode_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        dec = tok.incremental_decoder()
        chunks = []
        pos = 0
        while pos < len(ids):
            step = rng.randrange(1, 4)
            chunks.append(dec.feed(ids[pos : pos + step]))
            pos += step
        chunks.append(dec.finish())
        assert "".join(chunks) == tok.decode(ids), ids


# ---- loading errors and template sources ------------------------------------------------------


def test_missing_directory_and_files_raise_tokenizer_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot load"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config_and_missing_template(tmp_path: Path, tok_dirs: dict[str, Path]) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dirs["glm45"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": 5}')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: chat_template must be"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    builtin = Tokenizer.from_dir(tmp_path, chat_template="glm47")
    assert (
        builtin.apply_chat_template([{"role": "user", "content": "hi"}]) == "[gMASK]<sop><|user|>hi<|assistant|><think>"
    )


def test_template_sources_precedence_and_named_list(tmp_path: Path, tok_dirs: dict[str, Path]) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dirs["glm45"] / "tokenizer.json").read_bytes())
    config = {
        "eos_token": "<|endoftext|>",
        "chat_template": [
            {"name": "default", "template": "D{{ messages[0].content }}{{ eos_token }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "Dx<|endoftext|>"
    assert tok.apply_chat_template(msgs, tools=[{"name": "a"}, {"name": "b"}]) == "T2"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(msgs, tokenize=False) == "Dx<|endoftext|>"

    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template(msgs) == "J1"
    assert tok.apply_chat_template(msgs, tools=[{"name": "a"}]) == "J1"  # the file replaces the config's list
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(msgs, tokenize=False) == "J1"


def test_incremental_decoder_window_path_for_other_decoders(tok_dirs: dict[str, Path]) -> None:
    """Decoders other than plain ByteLevel go through the re-decode window; same text comes out."""
    import tokenizers

    backend = tokenizers.Tokenizer.from_file(str(tok_dirs["glm45"] / "tokenizer.json"))
    backend.decoder = tokenizers.decoders.Sequence([tokenizers.decoders.ByteLevel()])
    tok = Tokenizer(backend)
    assert not tok.is_byte_level
    for text in UNICODE_SAMPLES:
        ids = tok.encode(text + "<|user|>")
        deltas = _stream(tok.incremental_decoder(), ids)
        assert "".join(deltas) == tok.decode(ids) == text + "<|user|>"
        assert not any("\ufffd" in d for d in deltas)
