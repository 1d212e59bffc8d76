"""Tokenizer wrapper: special ids, exact round trips, streaming decode, chat templates, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from dgemma.tokenizer import SPECIAL_TOKENS, StreamDecoder, Tokenizer, TokenizerError, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def fibonacci(n):\n\tif n < 2:\n\t\treturn n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Café, naïve, façade, crème brûlée, Zürich, São Paulo, Ångström.",
    "Emoji: 😀 🎉 👍🏽 👨‍👩‍👧 and CJK: 日本語のテキスト, 中文文本, 한국어.",
    "for i in range(10):\r\n    print(i)  # windows line endings\r\n",
] * 8

ROUND_TRIP = [
    "hello world",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn {'a': [1, 2]}\n\n\n",
    "tabs\tand\r\nCRLF\rand\x0bvertical\x0cform feed",
    "Crème brûlée à Zürich — “quotes” … ½",
    "😀🎉👍🏽 👨‍👩‍👧 🇫🇷 日本語 한국어 עברית العربية",
    "e\u0301 (combining) vs é, ﬁ ligature, \u200b zero width",
    "",
    "\x00 control \x1b[31m escape",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_bpe(CORPUS, vocab_size=400, path=tmp_path_factory.mktemp("tok"))


def test_special_ids_follow_gemma_order(tok: Tokenizer) -> None:
    assert [tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert [tok.start_of_turn_id, tok.end_of_turn_id] == [5, 6]
    assert [tok.id_to_token(i) for i in range(7)] == list(SPECIAL_TOKENS)
    assert tok.stop_ids() == [1, 6]
    assert 7 + 256 < tok.vocab_size <= 400


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_special_strings_parse_unless_asked_not_to(tok: Tokenizer) -> None:
    text = "<bos>a<eos>b<start_of_turn>"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and tok.eos_id in ids and ids[-1] == tok.start_of_turn_id
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == text
    raw = tok.encode(text, parse_special=False)
    assert all(i >= len(SPECIAL_TOKENS) for i in raw)
    assert tok.decode(raw) == text
    assert tok.encode(text) == ids  # the raw twin did not change how the main instance parses


def test_add_bos_and_batch_encode(tok: Tokenizer) -> None:
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]
    assert tok.encode_batch(["x", "y"], add_bos=True) == [tok.encode(t, add_bos=True) for t in ["x", "y"]]


def test_load_from_folder_or_file_and_atomic_save(tok: Tokenizer, tmp_path: Path) -> None:
    assert tok.path is not None
    folder = tok.path.parent
    assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json"]  # no temporary files left behind
    for path in (folder, tok.path):
        loaded = Tokenizer.from_path(path)
        assert loaded.encode(ROUND_TRIP[4]) == tok.encode(ROUND_TRIP[4])
    saved = tok.save(tmp_path / "copy")
    assert saved == tmp_path / "copy" / "tokenizer.json"
    assert Tokenizer.from_path(saved).vocab_size == tok.vocab_size


def _stream(tok: Tokenizer, ids: list[int], **kwargs: bool) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", [CORPUS[3], CORPUS[4], ROUND_TRIP[5], ROUND_TRIP[6], "x😀y" * 3])
def test_stream_decoder_matches_full_decode_without_partial_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1, "the emoji should span several byte tokens in a 400-entry vocabulary"
    pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "😀" and pieces[-1] == ""
    # A stream that stops mid-character: nothing is emitted until flush, which reports the broken tail.
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush().endswith("\ufffd")


def test_stream_decoder_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<start_of_turn>model\nçà va 👍🏽<end_of_turn>")
    assert "".join(_stream(tok, ids)) == "model\nçà va 👍🏽"
    assert "".join(_stream(tok, ids, skip_special_tokens=False)) == tok.decode(ids, skip_special_tokens=False)


def _gemma_like_tokenizer(path: Path) -> Tokenizer:
    """A tiny SentencePiece-style tokenizer as Gemma's is built: ▁ for spaces and <0xNN> byte-fallback tokens."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "hel", "hell", "hello", "▁w", "▁wo", "▁wor", "é"]:
        vocab[piece] = len(vocab)
    merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o"), ("▁", "w"), ("▁w", "o"), ("▁wo", "r")]
    inner = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    inner.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    inner.decoder = tokenizers.decoders.Sequence(
        [tokenizers.decoders.Replace("▁", " "), tokenizers.decoders.ByteFallback(), tokenizers.decoders.Fuse()]
    )
    path.mkdir()
    inner.save(str(path / "tokenizer.json"))
    return Tokenizer.from_path(path)


def test_stream_decoder_on_byte_fallback_tokenizer(tmp_path: Path) -> None:
    tok = _gemma_like_tokenizer(tmp_path / "gemma-like")
    text = "hello world é😀 hello 日本"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_builtin_chat_template(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi!  "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Add 2+2."}]},
    ]
    expected = (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nAdd 2+2.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected.removesuffix(
        "<start_of_turn>model\n"
    )
    ids = tok.encode(expected)
    assert ids[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert ids.count(tok.start_of_turn_id) == 4 and ids.count(tok.end_of_turn_id) == 3
    assert tok.decode(ids[ids.index(tok.end_of_turn_id) - 1 :], skip_special_tokens=False).startswith("!<end_of")


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "assistant", "content": "first"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
        [{"role": "user", "content": {"not": "text"}}],
    ],
)
def test_builtin_chat_template_rejects_bad_conversations(tok: Tokenizer, messages: list[dict]) -> None:
    with pytest.raises(TokenizerError, match="message"):
        tok.apply_chat_template(messages)


def test_jinja_chat_template_from_folder(tok: Tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "with-template"
    tok.save(folder)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}[model]{% endif %}"
            }
        ),
        encoding="utf-8",
    )
    messages = [{"role": "user", "content": "hi"}]
    assert Tokenizer.from_path(folder).apply_chat_template(messages) == "<bos>[user]hi\n[model]"
    # chat_template.jinja takes precedence over tokenizer_config.json, and raise_exception becomes TokenizerError.
    (folder / "chat_template.jinja").write_text("{{ raise_exception('no ' + messages[0].role) }}", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no user"):
        Tokenizer.from_path(folder).apply_chat_template(messages)
    # The environment is sandboxed: reaching for Python internals fails instead of running.
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}", encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.from_path(folder).apply_chat_template(messages)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(TokenizerError, match="too small"):
        train_bpe(["abc"], vocab_size=100, path=tmp_path / "small")


# --- add_bos_default: tokenizer_config.json, else the post-processor, else the Gemma default ----------------------


def _folder_with_post_processor(tok: Tokenizer, folder: Path, processor) -> Path:
    inner = tokenizers.Tokenizer.from_str(tok.inner.to_str())
    inner.post_processor = processor
    Tokenizer(inner).save(folder)
    return folder


def test_add_bos_gemma_default_without_config_or_post_processor(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "plain")
    loaded = Tokenizer.from_path(tmp_path / "plain")
    assert loaded.add_bos_default is True and loaded.add_bos_source == "Gemma default"
    bundled = Tokenizer.from_path(Path(__file__).resolve().parent.parent / "dgemma" / "assets" / "tokenizer.json")
    assert bundled.add_bos_default is True
    # A tokenizer with no <bos> at all cannot follow the Gemma default: no bos, and no error.
    word = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    assert Tokenizer(word).add_bos_default is False


def test_add_bos_from_tokenizer_config(tok: Tokenizer, tmp_path: Path) -> None:
    TP = tokenizers.processors.TemplateProcessing
    folder = _folder_with_post_processor(tok, tmp_path / "cfg", TP(single="<bos> $A", special_tokens=[("<bos>", 2)]))
    assert Tokenizer.from_path(folder).add_bos_default is True  # the post-processor says yes ...
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}), encoding="utf-8")
    loaded = Tokenizer.from_path(folder)
    assert loaded.add_bos_default is False and loaded.add_bos_source == "tokenizer_config.json add_bos_token"
    # ... and the explicit choice survives a save to another folder.
    loaded.save(tmp_path / "copy")
    assert Tokenizer.from_path(tmp_path / "copy").add_bos_default is False
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": "yes"}), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"add_bos_token must be true or false \(got 'yes'\)"):
        Tokenizer.from_path(folder)


def test_add_bos_from_post_processor(tok: Tokenizer, tmp_path: Path) -> None:
    P = tokenizers.processors
    with_bos = _folder_with_post_processor(
        tok, tmp_path / "bos", P.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)]))
    loaded = Tokenizer.from_path(with_bos)
    assert loaded.add_bos_default is True and loaded.add_bos_source == "tokenizer.json post_processor"
    no_bos = _folder_with_post_processor(
        tok, tmp_path / "eos", P.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)]))
    assert Tokenizer.from_path(no_bos).add_bos_default is False
    byte_level = _folder_with_post_processor(tok, tmp_path / "bl", P.ByteLevel())  # GPT-2 style: never a bos
    assert Tokenizer.from_path(byte_level).add_bos_default is False
    sequence = _folder_with_post_processor(  # Llama-3 style: ByteLevel then a bos template
        tok, tmp_path / "seq",
        P.Sequence([P.ByteLevel(), P.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])]))
    assert Tokenizer.from_path(sequence).add_bos_default is True


def test_add_bos_asked_but_no_bos_token(tmp_path: Path) -> None:
    word = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    folder = tmp_path / "nobos"
    Tokenizer(word).save(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}), encoding="utf-8")
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_path(folder)
    assert str(folder / "tokenizer.json") in str(e.value) and "set add_bos_token to false" in str(e.value)
