"""The chat template: how a conversation becomes token ids, and which of them are trained on.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`.
Each message is rendered as its role's header token, its content, and the end token, with nothing
in between (no newlines, no BOS), so the token stream is exactly

    <|system|>You are terse.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|>

The four tokens are single sentencepiece pieces of the tokenizer: reserve them when the tokenizer is
trained (`tokenizer.user_defined_symbols`, see CHAT_TOKENS and docs/finetune.md). sentencepiece
never merges across a user-defined piece, so encoding the rendered text in one call gives the same
ids as encoding each content alone; this is what makes `JINJA_TEMPLATE` (the Hugging Face export's
chat template) reproduce `render_conversation` id for id.

Fine-tuning trains on the assistant's content and its end token only (the model learns to answer
and to stop), never on the system or user text or on the headers. The shard writer appends EOS
after the conversation, as after every document; EOS is not trained on either.

`tokenizer` below is anything with `encode(text) -> list[int]` and `id_to_piece(i) -> str`: our
`llmtrain.data.tokenizer.Tokenizer` or a raw `sentencepiece.SentencePieceProcessor`.
"""

from __future__ import annotations

from llmtrain.errors import DataError

ROLES = ("system", "user", "assistant")
HEADERS = {role: f"<|{role}|>" for role in ROLES}
END = "<|end|>"
CHAT_TOKENS: tuple[str, ...] = (*HEADERS.values(), END)
"""The template's special tokens, each one piece of a chat-capable tokenizer."""

JINJA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
"""The same rendering as a Hugging Face chat template (written into the export's tokenizer_config.json)."""

_FIX = (
    "reserve them when the tokenizer is trained: tokenizer.user_defined_symbols="
    "['<|system|>','<|user|>','<|assistant|>','<|end|>'] (new data.dir), or fine-tune from a run "
    "whose tokenizer has them (docs/finetune.md)"
)


def chat_token_ids(tokenizer, where: str = "tokenizer") -> dict[str, int]:
    """{token: id} of the template's tokens; DataError naming `where` if any is not a single piece."""
    ids, missing = {}, []
    for token in CHAT_TOKENS:
        encoded = tokenizer.encode(token)
        if len(encoded) == 1 and tokenizer.id_to_piece(encoded[0]) == token:
            ids[token] = encoded[0]
        else:
            missing.append(token)
    if missing:
        raise DataError(
            f"{where}: the tokenizer lacks the chat tokens {', '.join(missing)} as single pieces; {_FIX}"
        )
    return ids


def check_chat_tokenizer(tokenizer, where: str) -> None:
    """One-line DataError (naming `where`, e.g. the tokenizer's path) unless every chat token is one piece."""
    chat_token_ids(tokenizer, where)


def end_token_id(tokenizer) -> int:
    """The id of `<|end|>`: the token an assistant turn ends with, where generation stops."""
    return chat_token_ids(tokenizer)[END]


def validate_messages(messages, where: str, *, need_assistant: bool = True) -> None:
    """One-line DataError naming `where` (e.g. `file:line`) for a conversation the template cannot render.

    Refused: a non-list or empty list; a message that is not an object with a known `role` and a
    non-empty string `content`; a `system` message anywhere but first; content holding one of the
    template's tokens (it would end a turn early); and, with `need_assistant`, no assistant turn
    (nothing to train on).
    """
    problem = conversation_problem(messages, need_assistant=need_assistant)
    if problem is not None:
        raise DataError(f"{where}: {problem}")


def conversation_problem(messages, *, need_assistant: bool = True) -> str | None:
    """What is wrong with a conversation (see `validate_messages`), or None when it renders."""
    if not isinstance(messages, list) or not messages:
        kind = "an empty list" if isinstance(messages, list) else type(messages).__name__
        return f"'messages' must be a non-empty list of messages, got {kind}"
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"message {i} must be an object with 'role' and 'content', got {type(msg).__name__}"
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            return f"message {i}: unknown role {role!r} (roles: {', '.join(ROLES)})"
        if role == "system" and i > 0:
            return f"message {i}: a system message may only come first"
        if not isinstance(content, str):
            return f"message {i}: 'content' must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"message {i}: empty content"
        for token in CHAT_TOKENS:
            if token in content:
                return f"message {i}: content holds the template token {token}"
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        return "the conversation has no assistant turn (nothing to train on)"
    return None


def render_text(messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text, as JINJA_TEMPLATE renders it (for display and tests)."""
    text = "".join(HEADERS[m["role"]] + m["content"] + END for m in messages)
    return text + HEADERS["assistant"] if add_generation_prompt else text


def render_conversation(messages, tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, trained): the token ids of a whole conversation and, per id, whether it is trained on
    (assistant content and its end token). Validate the messages first (`validate_messages`)."""
    special = chat_token_ids(tokenizer)
    ids: list[int] = []
    trained: list[bool] = []
    for msg in messages:
        learn = msg["role"] == "assistant"
        content = tokenizer.encode(msg["content"])
        ids += [special[HEADERS[msg["role"]]], *content, special[END]]
        trained += [False] + [learn] * (len(content) + 1)
    return ids, trained


def render_prompt(messages, tokenizer) -> list[int]:
    """The conversation so far plus the assistant header: what the model continues to answer."""
    ids, _ = render_conversation(messages, tokenizer)
    return ids + [chat_token_ids(tokenizer)[HEADERS["assistant"]]]


def trained_flags(ids, token_ids: dict[str, int], eos_id: int):
    """The `render_conversation` flags of rendered conversations back to back (each may end with
    EOS), recovered from the ids alone: a token is trained on when the last header before it is
    the assistant's, it is no header itself, and it is not EOS. Exact because the chat tokens are
    single pieces that content never holds (`validate_messages`). numpy uint8 array, 0/1."""
    import numpy as np

    ids = np.asarray(ids)
    headers = np.array([token_ids[HEADERS[r]] for r in ROLES], dtype=ids.dtype)
    is_header = np.isin(ids, headers)
    # index of the latest header at or before each position (-1 before the first)
    last = np.maximum.accumulate(np.where(is_header, np.arange(ids.size), -1)) if ids.size else ids
    under_assistant = (last >= 0) & (ids[np.maximum(last, 0)] == token_ids[HEADERS["assistant"]])
    return (under_assistant & ~is_header & (ids != eos_id)).astype(np.uint8)
