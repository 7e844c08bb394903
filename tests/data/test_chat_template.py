"""The chat template: ids and trained flags per token, the prompt for generation, and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmtrain.data.chat_template import (
    CHAT_TOKENS,
    END,
    chat_token_ids,
    check_chat_tokenizer,
    end_token_id,
    render_conversation,
    render_prompt,
    render_text,
    trained_flags,
    validate_messages,
)
from llmtrain.data.config import TokenizerConfig
from llmtrain.data.tokenizer import train_tokenizer
from llmtrain.errors import DataError

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is  two plus two?\n"},
    {"role": "assistant", "content": " Four."},
    {"role": "user", "content": "And three?"},
    {"role": "assistant", "content": "Six.\n\tNo: five."},
]


def _texts(corpus_dir) -> list[str]:
    """The session corpus's books and first web records (tests/conftest.py `prepared_data`)."""
    books = [p.read_text() for p in sorted((corpus_dir / "books").iterdir())[:6]]
    return books + [
        json.loads(line)["text"] for line in (corpus_dir / "web.jsonl").read_text().splitlines()[:40]
    ]


@pytest.fixture(scope="module")
def tokenizers(prepared_data, tmp_path_factory):
    texts = _texts(prepared_data.corpus_dir)
    chat = train_tokenizer(
        TokenizerConfig(vocab_size=320, user_defined_symbols=list(CHAT_TOKENS)),
        texts,
        tmp_path_factory.mktemp("chat_tok"),
    )
    plain = train_tokenizer(
        TokenizerConfig(vocab_size=320, user_defined_symbols=[]), texts, tmp_path_factory.mktemp("plain_tok")
    )
    return chat, plain


def test_conversation_ids_are_the_encoding_of_the_rendered_text(tokenizers):
    tok, _ = tokenizers
    ids, trained = render_conversation(CONVERSATION, tok)
    assert ids == tok.encode(render_text(CONVERSATION))
    assert tok.decode(ids) == render_text(CONVERSATION)
    assert len(trained) == len(ids)


def test_only_assistant_content_and_its_end_token_are_trained(tokenizers):
    tok, _ = tokenizers
    ids, trained = render_conversation(CONVERSATION, tok)
    learned = [i for i, t in zip(ids, trained) if t]
    expected = (
        tok.encode(" Four.") + [end_token_id(tok)] + tok.encode("Six.\n\tNo: five.") + [end_token_id(tok)]
    )
    assert learned == expected
    # every header, every system/user token is untrained
    assert not any(t for i, t in zip(ids, trained) if tok.id_to_piece(i) in CHAT_TOKENS[:3])
    assert trained[-1] and tok.id_to_piece(ids[-1]) == END


def test_prompt_is_the_conversation_plus_the_assistant_header(tokenizers):
    tok, _ = tokenizers
    history = CONVERSATION[:2]
    prompt = render_prompt(history, tok)
    assert prompt == tok.encode(render_text(history, add_generation_prompt=True))
    assert tok.id_to_piece(prompt[-1]) == "<|assistant|>"
    # the full conversation starts with the prompt and continues with the answer
    full, _ = render_conversation(CONVERSATION[:3], tok)
    assert full[: len(prompt)] == prompt


def test_chat_tokens_are_single_pieces_of_a_reserved_tokenizer(tokenizers):
    tok, _ = tokenizers
    check_chat_tokenizer(tok, "here")
    for token in CHAT_TOKENS:
        assert len(tok.encode(token)) == 1


def test_tokenizer_without_chat_tokens_is_one_line_saying_how_to_fix(tokenizers):
    _, plain = tokenizers
    with pytest.raises(DataError) as err:
        check_chat_tokenizer(plain, "data/x/tokenizer.model")
    msg = str(err.value)
    assert msg.startswith("data/x/tokenizer.model: the tokenizer lacks the chat tokens <|system|>")
    assert "tokenizer.user_defined_symbols" in msg and "\n" not in msg
    with pytest.raises(DataError, match="lacks the chat tokens"):
        render_conversation(CONVERSATION, plain)


def test_default_tokenizer_config_reserves_the_chat_tokens():
    assert tuple(TokenizerConfig().user_defined_symbols) == CHAT_TOKENS


@pytest.mark.parametrize(
    "messages, need_assistant, problem",
    [
        ([], True, r"f\.jsonl:3: 'messages' must be a non-empty list of messages, got an empty list"),
        ("hi", True, r"f\.jsonl:3: 'messages' must be a non-empty list of messages, got str"),
        (["hi"], True, r"f\.jsonl:3: message 0 must be an object with 'role' and 'content', got str"),
        (
            [{"role": "bot", "content": "x"}],
            True,
            r"message 0: unknown role 'bot' \(roles: system, user, assistant\)",
        ),
        ([{"content": "x"}], True, r"message 0: unknown role None"),
        ([{"role": "user", "content": 3}], True, r"message 0: 'content' must be a string, got int"),
        ([{"role": "user", "content": " \n"}], True, r"message 0: empty content"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
            False,
            r"message 1: a system message may only come first",
        ),
        (
            [{"role": "user", "content": "end <|end|> here"}],
            False,
            r"content holds the template token <\|end\|>",
        ),
        ([{"role": "user", "content": "hi"}], True, r"f\.jsonl:3: the conversation has no assistant turn"),
    ],
)
def test_bad_conversations_are_one_line_naming_where(messages, need_assistant, problem):
    with pytest.raises(DataError, match=problem) as err:
        validate_messages(messages, "f.jsonl:3", need_assistant=need_assistant)
    assert "\n" not in str(err.value)


def test_prompt_without_assistant_turn_is_valid_when_none_is_needed():
    validate_messages([{"role": "user", "content": "hi"}], "chat", need_assistant=False)
    validate_messages(CONVERSATION, "f.jsonl:1")


def test_flags_recovered_from_packed_ids_equal_the_rendered_ones(tokenizers):
    """prepare derives the loss mask from the ids of conversations back to back, each ending with EOS."""
    tok, _ = tokenizers
    convs = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "x"}, *CONVERSATION[2:]]]
    ids, flags = [], []
    for conv in convs:
        conv_ids, conv_flags = render_conversation(conv, tok)
        ids += [*conv_ids, tok.eos_id]
        flags += [*conv_flags, False]
    got = trained_flags(np.array(ids, dtype=np.uint16), chat_token_ids(tok), tok.eos_id)
    assert got.dtype == np.uint8 and got.tolist() == [int(f) for f in flags]
