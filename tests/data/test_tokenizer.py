"""Tokenizer: lossless round trips, identity hash independent of where it was trained, reuse rules."""

from __future__ import annotations

import json

import pytest
from conftest import write_corpus

from llmtrain.errors import ConfigError
from llmtrain.data.config import TokenizerConfig, check_tokenizer_config
from llmtrain.data.tokenizer import (
    SIDECAR_FILE,
    Tokenizer,
    get_tokenizer,
    load_tokenizer,
    model_hash,
    train_tokenizer,
)
from llmtrain.errors import DataError


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[str]:
    books, web = write_corpus(tmp_path_factory.mktemp("corpus"), books=16, records=120)
    out = [p.read_text() for p in sorted(books.iterdir())]
    out += [json.loads(line)["text"] for line in web.read_text().splitlines()]
    code = "def f(x):\n    if x:\n        return {'a': [1, 2]}\n\treturn None  # tab\n"
    return out + [code] * 150


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(TokenizerConfig(vocab_size=400), texts, tmp_path_factory.mktemp("tok"))


def fail_if_called():
    raise AssertionError("the tokenizer was retrained instead of reused")


def test_trained_model_has_requested_vocab_ids_and_sidecar(trained):
    assert (trained.vocab_size, trained.unk_id, trained.bos_id, trained.eos_id, trained.pad_id) == (
        400,
        0,
        1,
        2,
        3,
    )
    side = json.loads((trained.path.parent / SIDECAR_FILE).read_text())
    assert side["hash"] == trained.hash and side["vocab_size"] == 400 and side["model_type"] == "bpe"
    assert side["settings"]["vocab_size"] == 400 and side["eos_id"] == 2
    assert [p.name for p in trained.path.parent.iterdir() if p.name.startswith(".")] == []  # no temp left


@pytest.mark.parametrize(
    "text",
    [
        "def f(x):\n    return x  # spaces   kept\n",
        "\n\n  leading blanks and trailing  \t\n",
        "unicode: héllo wörld ☃ 😀 中文",
        "",
    ],
)
def test_decode_encode_is_lossless(trained, text):
    ids = trained.encode(text)
    assert trained.decode(ids) == text
    assert trained.encode_batch([text, text]) == [ids, ids]
    assert trained.eos_id not in ids and trained.bos_id not in ids


def test_code_whitespace_becomes_pieces_not_bytes(trained):
    pieces = [trained.id_to_piece(i) for i in trained.encode("    return x\n")]
    assert "▁▁▁▁" in pieces or "▁▁▁▁return" in pieces
    assert not any(p.startswith("<0x") for p in pieces)


def test_same_text_in_two_folders_gives_the_same_hash(texts, tmp_path, trained):
    cfg = TokenizerConfig(vocab_size=400, threads=1)
    other = train_tokenizer(cfg, texts, tmp_path / "elsewhere" / "deeper")
    assert other.hash == trained.hash
    assert other.encode(texts[0]) == trained.encode(texts[0])
    smaller = train_tokenizer(TokenizerConfig(vocab_size=360), texts, tmp_path / "small")
    assert smaller.hash != trained.hash


def test_hash_ignores_the_trainer_spec_but_not_the_pieces(trained):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(trained.model_bytes)
    proto.trainer_spec.model_prefix = "/some/other/folder/tokenizer"
    proto.trainer_spec.num_threads = 7
    moved = proto.SerializeToString()
    assert moved != trained.model_bytes and model_hash(moved) == trained.hash
    proto.pieces[300].score += 1.0
    assert model_hash(proto.SerializeToString()) != trained.hash


def test_reuse_without_retraining_and_refuse_changed_settings(texts, tmp_path):
    cfg = TokenizerConfig(vocab_size=400)
    first, how = get_tokenizer(cfg, tmp_path, lambda: texts)
    assert how == "trained"
    again, how = get_tokenizer(cfg, tmp_path, fail_if_called)
    assert how == "reused" and again.hash == first.hash
    with pytest.raises(DataError, match=r"tokenizer\.json: .*vocab_size=400 \(config: 512\).*delete"):
        get_tokenizer(TokenizerConfig(vocab_size=512), tmp_path, fail_if_called)


def test_model_without_sidecar_counts_as_interrupted_and_is_retrained(texts, tmp_path):
    cfg = TokenizerConfig(vocab_size=400)
    tok, _ = get_tokenizer(cfg, tmp_path, lambda: texts)
    (tmp_path / SIDECAR_FILE).unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"half a model")
    again, how = get_tokenizer(cfg, tmp_path, lambda: texts)
    assert how == "trained" and again.hash == tok.hash


def test_modified_model_file_is_detected(texts, tmp_path, trained):
    cfg = TokenizerConfig(vocab_size=400)
    get_tokenizer(cfg, tmp_path, lambda: texts)
    other = train_tokenizer(TokenizerConfig(vocab_size=360), texts, tmp_path / "x")
    (tmp_path / "tokenizer.model").write_bytes(other.model_bytes)
    with pytest.raises(DataError, match=r"tokenizer\.model: does not match the hash"):
        get_tokenizer(cfg, tmp_path, fail_if_called)


def test_given_model_path_is_copied_then_reused(texts, trained, tmp_path):
    cfg = TokenizerConfig(path=str(trained.path), vocab_size=999)
    tok, how = get_tokenizer(cfg, tmp_path / "data", fail_if_called)
    assert how == "copied" and tok.hash == trained.hash and tok.vocab_size == 400
    assert load_tokenizer(tmp_path / "data").hash == trained.hash
    assert get_tokenizer(cfg, tmp_path / "data", fail_if_called)[1] == "reused"
    moved = tmp_path / "moved.model"
    moved.write_bytes(trained.model_bytes)  # same pieces elsewhere: still the same tokenizer
    assert get_tokenizer(TokenizerConfig(path=str(moved)), tmp_path / "data", fail_if_called)[1] == "reused"
    other = train_tokenizer(TokenizerConfig(vocab_size=360), texts, tmp_path / "other")
    with pytest.raises(
        DataError, match=r"tokenizer\.json: the tokenizer in .* is not the model at tokenizer\.path"
    ):
        get_tokenizer(TokenizerConfig(path=str(other.path)), tmp_path / "data", fail_if_called)
    with pytest.raises(DataError, match=r"tokenizer\.path .*missing\.model: tokenizer model not found"):
        get_tokenizer(
            TokenizerConfig(path=str(tmp_path / "missing.model")), tmp_path / "data", fail_if_called
        )


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer\.model: no tokenizer here; run `llmtrain prepare` first"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x0a\x05junk!" * 3)
    with pytest.raises(DataError, match=r"bad\.model: not a valid sentencepiece model"):
        Tokenizer.load(bad)


def test_user_defined_symbols_are_single_pieces(texts, tmp_path):
    tok = train_tokenizer(
        TokenizerConfig(vocab_size=400, user_defined_symbols=["<|endoftext|>", "<tab>"]), texts, tmp_path
    )
    ids = tok.encode("a<|endoftext|>b<tab>")
    assert [tok.id_to_piece(i) for i in ids].count("<|endoftext|>") == 1 and "<tab>" in map(
        tok.id_to_piece, ids
    )


def test_unigram_model_type(texts, tmp_path):
    tok = train_tokenizer(TokenizerConfig(vocab_size=400, model_type="unigram"), texts, tmp_path)
    assert tok.vocab_size == 400 and tok.info()["model_type"] == "unigram"
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_char_budget_bounds_the_training_text(texts, tmp_path):
    tok = train_tokenizer(TokenizerConfig(vocab_size=340, char_budget=5000), texts, tmp_path)
    side = json.loads((tmp_path / SIDECAR_FILE).read_text())
    assert side["trained_chars"] == 5000 and side["trained_docs"] == 2 and tok.vocab_size == 340


def test_bad_settings_give_one_clear_error(texts, tmp_path):
    """Special ids are checked once, where TokenizerConfig is (load_config runs it at compose time)."""
    with pytest.raises(ConfigError, match=r"tokenizer: special ids must differ"):
        check_tokenizer_config(TokenizerConfig(vocab_size=400, pad_id=2))
    with pytest.raises(ConfigError, match=r"tokenizer\.eos_id: must be >= 0"):
        check_tokenizer_config(TokenizerConfig(vocab_size=400, eos_id=-1))
    with pytest.raises(DataError, match=r"Vocabulary size too high.*lower tokenizer\.vocab_size"):
        train_tokenizer(TokenizerConfig(vocab_size=5000), ["tiny text\n"] * 10, tmp_path)
