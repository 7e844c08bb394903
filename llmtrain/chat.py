"""`llmtrain chat`: a multi-turn terminal conversation with a checkpoint, replies streamed as produced.

The conversation is rendered with the chat template the model was fine-tuned on
(`llmtrain.data.chat_template`); a reply ends at the template's end token (or at EOS, or at any other
template token: the model starting a new turn). When the history no longer fits the context with room
for a reply, the oldest turns go first; the system message stays. One message per line:
`/reset` starts over, `/exit` or end of input (Ctrl-D) quits, Ctrl-C stops the reply being written.
"""

from __future__ import annotations

import sys
from typing import TextIO

from llmtrain.config import Config
from llmtrain.data.chat_template import (
    CHAT_TOKENS,
    chat_token_ids,
    check_chat_tokenizer,
    render_prompt,
    validate_messages,
)
from llmtrain.errors import DataError
from llmtrain.generate import TextStream, load_source, row_generator, sampling_params

HELP = "/reset starts a new conversation, /exit (or Ctrl-D) quits"


class ChatSession:
    """The history of one conversation and the model that answers in it."""

    def __init__(self, model, tokenizer, *, system: str | None, max_new_tokens: int, params, seed: int):
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.params, self.seed = params, seed
        ids = chat_token_ids(tokenizer)
        # a reply ends at <|end|>; a header means the model began another turn: end there too
        self.stop_ids = tuple(ids[t] for t in CHAT_TOKENS) + (
            (tokenizer.eos_id,) if tokenizer.eos_id >= 0 else ()
        )
        self.turn = 0  # every reply draws from its own random stream: a session replays exactly
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self, messages: list[dict]) -> tuple[list[dict], list[int]]:
        """The newest history whose prompt leaves room for a reply (oldest turns dropped first, the
        system message kept), and its prompt ids."""
        context = self.model.cfg.max_seq_len
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(head) :]
        while True:
            ids = render_prompt(head + turns, self.tokenizer)
            if len(ids) + self.max_new_tokens <= context or len(turns) == 1:
                break
            turns = turns[1:]
            while turns and turns[0]["role"] != "user":  # a history starts with the user's turn
                turns = turns[1:]
        if len(ids) >= context:
            what = "with the system message " if head else ""
            raise DataError(
                f"your message: {len(ids)} tokens {what}leave no room for a reply in model.max_seq_len={context}"
            )
        return head + turns, ids

    def reply(self, text: str, write=None) -> str:
        """The model's answer to the user's `text`; `write(piece)` receives it as it is produced.
        A DataError (a message the template cannot carry, or too long) leaves the history unchanged."""
        from llmtrain.model.sampling import decode

        message = {"role": "user", "content": text}
        validate_messages([message], "your message", need_assistant=False)
        history, ids = self._fit([*self.messages, message])
        room = min(self.max_new_tokens, self.model.cfg.max_seq_len - len(ids))
        stream = TextStream(self.tokenizer.decode, ids)

        def on_token(_row: int, token: int) -> None:
            if token in self.stop_ids:
                return
            piece = stream.feed(token)
            if piece and write is not None:
                write(piece)

        self.turn += 1
        decode(
            self.model,
            [ids],
            room,
            self.params,
            rng=[row_generator(self.seed, self.turn, 0)],
            stop_ids=self.stop_ids,
            on_token=on_token,
        )
        rest = stream.finish()
        if rest and write is not None:
            write(rest)
        answer = stream.text
        self.messages = [*history, {"role": "assistant", "content": answer}]
        return answer


def _read_line(interactive: bool, stdin: TextIO, stdout: TextIO) -> str | None:
    """The user's next line, or None at the end of input."""
    if interactive:
        try:
            return input("you> ")  # readline editing and history on a terminal
        except EOFError:
            stdout.write("\n")
            return None
    line = stdin.readline()
    return None if line == "" else line.rstrip("\n")


def converse(
    session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO, *, interactive: bool
) -> int:
    """The read-reply loop until /exit or the end of input."""

    def write(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    while True:
        try:
            line = _read_line(interactive, stdin, stdout)
        except KeyboardInterrupt:
            stdout.write("\n")
            return 0
        if line is None:
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=stdout, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"llmtrain chat: unknown command {text}; {HELP}", file=stderr, flush=True)
            continue
        if interactive:
            write("assistant> ")
        try:
            session.reply(line, write)
        except DataError as err:
            stdout.flush()
            print(f"llmtrain chat: {err}", file=stderr, flush=True)
            continue
        except KeyboardInterrupt:  # stop this reply, keep the conversation as it was
            write("\n")
            print("llmtrain chat: reply interrupted (not kept)", file=stderr, flush=True)
            continue
        write("\n")


def main(cfg: Config) -> int:
    c = cfg.chat
    if c.system is not None:  # before the model loads
        validate_messages([{"role": "system", "content": c.system}], "chat.system", need_assistant=False)
    source = load_source(cfg, c.checkpoint, "chat.checkpoint")
    tokenizer = source.tokenizer
    check_chat_tokenizer(tokenizer, f"{tokenizer.path or source.path}")
    session = ChatSession(
        source.model,
        tokenizer,
        system=c.system,
        max_new_tokens=c.max_new_tokens,
        params=sampling_params(c),
        seed=cfg.run.seed if c.seed is None else c.seed,
    )
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    print(f"llmtrain chat: {source.path} (step {source.step}); {HELP}", file=sys.stderr, flush=True)
    return converse(session, sys.stdin, sys.stdout, sys.stderr, interactive=interactive)
