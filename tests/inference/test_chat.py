"""`llmtrain chat` over the session's checkpoint (its tokenizer reserves the chat tokens): driven through
stdin in-process and through a pseudo-terminal, history trimming, commands and refusals."""

from __future__ import annotations

import io
import os
import sys

import pytest
import torch

from llmtrain.chat import ChatSession, converse
from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.data.chat_template import render_prompt
from llmtrain.errors import DataError

SAMPLING = [
    "chat.max_new_tokens=12",
    "chat.temperature=1.0",
    "chat.top_k=0",
    "chat.top_p=0.95",
    "chat.seed=5",
]


@pytest.fixture(scope="module")
def loaded(trained):
    from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

    model = load_checkpoint_model(load_config(trained), None, device=torch.device("cpu"))
    return model.model, load_matching_tokenizer(model)


def session(loaded, system: str | None = "Be brief.", max_new_tokens: int = 12) -> ChatSession:
    from llmtrain.model.sampling import SamplingParams

    model, tokenizer = loaded
    params = SamplingParams(temperature=1.0, top_p=0.95)
    return ChatSession(model, tokenizer, system=system, max_new_tokens=max_new_tokens, params=params, seed=5)


def test_chat_through_stdin_answers_each_turn_with_the_history_and_resets(
    trained, loaded, capsys, monkeypatch
):
    script = "Hello there\nAnd then?\n/reset\n\nHello there\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert cli_run("chat", [*trained, *SAMPLING, "chat.system=Be brief."]) == 0
    captured = capsys.readouterr()

    direct = session(loaded)
    first = direct.reply("Hello there")
    second = direct.reply("And then?")
    # the second prompt carried the first exchange
    assert [m["role"] for m in direct.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert direct.messages[2]["content"] == first
    direct.reset()
    assert direct.messages == [{"role": "system", "content": "Be brief."}]
    third = direct.reply("Hello there")
    assert captured.out == f"{first}\n{second}\n(new conversation)\n{third}\n"
    assert "never" not in captured.out
    assert "/reset starts a new conversation" in captured.err  # the banner


def test_history_is_trimmed_from_the_oldest_turns_keeping_the_system_message(loaded):
    _, tokenizer = loaded
    chat = session(loaded, max_new_tokens=1024 - 60)  # 60 tokens of room for the prompt
    history = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        history += [
            {"role": "user", "content": f"question number {i} about things"},
            {"role": "assistant", "content": f"answer {i} is this"},
        ]
    history.append({"role": "user", "content": "last question"})
    kept, ids = chat._fit(history)
    assert kept[0] == history[0] and kept[-1] == history[-1] and kept[1]["role"] == "user"
    assert ids == render_prompt(kept, tokenizer)
    assert len(ids) <= 60
    # brute force: the longest tail of whole turns that fits
    starts = [i for i in range(1, len(history)) if history[i]["role"] == "user"]
    fitting = [s for s in starts if len(render_prompt(history[:1] + history[s:], tokenizer)) <= 60]
    assert kept == history[:1] + history[min(fitting) :]
    assert len(kept) < len(history)


def test_a_message_longer_than_the_context_or_holding_a_template_token_is_one_line(loaded):
    chat = session(loaded)
    chat.reply("Hi")
    before = list(chat.messages)
    with pytest.raises(DataError, match=r"your message: \d+ tokens with the system message leave no room"):
        chat.reply("ba " * 1200)
    with pytest.raises(DataError, match="content holds the template token <\\|end\\|>"):
        chat.reply("a <|end|> b")
    assert chat.messages == before
    out, err = io.StringIO(), io.StringIO()
    script = io.StringIO("ba " * 1200 + "\n/help\nHi\n")
    assert converse(chat, script, out, err, interactive=False) == 0  # end of input: a clean exit
    lines = err.getvalue().splitlines()
    assert len(lines) == 2 and "leave no room for a reply" in lines[0] and "unknown command /help" in lines[1]
    assert out.getvalue().count("\n") == 1  # one reply, to "Hi"


def test_chat_without_a_checkpoint_is_one_clear_line(prepared_data, tmp_path, capsys):
    assert cli_run("chat", [*prepared_data.overrides, f"run.dir={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete checkpoint" in err
    assert cli_run("chat", [*prepared_data.overrides, "chat.top_p=2"]) == 2
    assert "chat.top_p: must be in (0, 1]" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess: ~10 s of imports and checkpoint loading on 2 cores
@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_chat_in_a_pseudo_terminal_prompts_streams_and_exits(trained):
    import pty
    import select
    import subprocess
    import time

    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "llmtrain.cli", "chat", *trained, *SAMPLING]
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env, close_fds=True)
    os.close(child_fd)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(marker) < count:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([main_fd], [], [], 1)
            if ready:
                try:
                    seen += os.read(main_fd, 4096)
                except OSError:  # the child closed the terminal
                    break

    try:
        read_until(b"you> ", 1)
        os.write(main_fd, b"Hello there\n")
        read_until(b"you> ", 2)
        os.write(main_fd, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(main_fd)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert "assistant> " in text and text.index("assistant> ") > text.index("Hello there")
