"""Generation controls: batching, the KV cache, top-k / top-p / repetition penalty, stop strings,
streaming, prompt sources and their refusals."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llmtrain.cli import run as cli_run
from llmtrain.generate import TextStream, row_generator
from llmtrain.model import ModelConfig, build_model
from llmtrain.model.sampling import SamplingParams, decode, draw, filtered_probs, next_tokens, penalize

VOCAB = 100
PROMPTS = [[5, 17, 3, 9, 41, 2, 8], [11], [60, 61, 62, 63]]
CONTROLS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3),
]


def tiny(arch: str):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layers=2, d_model=64, n_heads=4, max_seq_len=64, vocab_size=VOCAB)
    if arch == "llama":
        cfg.n_kv_heads = 2  # GQA through the masked (padded) attention path too
    return build_model(cfg).eval()


def rngs(rows: list[int]) -> list[torch.Generator]:
    return [row_generator(7, r, 0) for r in rows]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("params", CONTROLS, ids=["greedy", "sampled", "filtered"])
def test_batched_prompts_of_different_lengths_give_the_unbatched_tokens(arch, params):
    model = tiny(arch)
    batched = decode(model, PROMPTS, 12, params, rng=rngs([0, 1, 2]))
    alone = [decode(model, [p], 12, params, rng=rngs([i]))[0] for i, p in enumerate(PROMPTS)]
    assert batched == alone
    assert all(len(row) == 12 for row in batched)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("params", CONTROLS, ids=["greedy", "sampled", "filtered"])
def test_kv_cache_and_full_recompute_give_identical_tokens(arch, params):
    model = tiny(arch)
    cached = decode(model, PROMPTS, 15, params, rng=rngs([0, 1, 2]))
    recomputed = decode(model, PROMPTS, 15, params, rng=rngs([0, 1, 2]), use_cache=False)
    assert cached == recomputed


def test_greedy_decoding_is_the_argmax_of_the_full_forward_for_every_padded_row():
    model = tiny("llama")
    rows = decode(model, PROMPTS, 6, SamplingParams(temperature=0))
    for prompt, new in zip(PROMPTS, rows):
        seq = torch.tensor([prompt])
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
        assert seq[0, len(prompt) :].tolist() == new


def test_top_p_one_and_top_k_zero_equal_plain_sampling():
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    u = torch.rand(64, generator=torch.Generator().manual_seed(2))
    # plain softmax sampling, computed independently: the first token whose cumulative mass passes u
    probs = torch.softmax(logits.double() / 0.7, dim=-1)
    plain = (probs.cumsum(-1) <= u.double()[:, None]).sum(-1)
    for top_k, top_p in ((0, 1.0), (None, None), (VOCAB, 1.0), (0, None)):
        got = draw(filtered_probs(logits, SamplingParams(0.7, top_k=top_k, top_p=top_p)), u)
        assert torch.equal(got, plain), (top_k, top_p)
    # through the decoding loop: the same tokens with the filters off as without them
    model = tiny("llama")
    off = decode(model, PROMPTS, 10, SamplingParams(0.9, top_k=0, top_p=1.0), rng=rngs([0, 1, 2]))
    assert off == decode(model, PROMPTS, 10, SamplingParams(0.9), rng=rngs([0, 1, 2]))


def test_top_k_and_top_p_keep_exactly_the_most_likely_tokens():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = {
        (None, 0.5): [0, 1, 0, 0],  # the top token alone reaches 0.5
        (None, 0.8): [0, 1, 0, 1],
        (None, 0.81): [0, 1, 1, 1],
        (2, None): [0, 1, 0, 1],
        (3, 0.7): [0, 1, 0, 1],
        (1, 1.0): [0, 1, 0, 0],
    }
    for (top_k, top_p), mask in kept.items():
        got = filtered_probs(logits, SamplingParams(1.0, top_k=top_k, top_p=top_p))
        expected = probs * torch.tensor(mask)
        expected = expected / expected.sum()
        torch.testing.assert_close(got / got.sum(), expected, msg=str((top_k, top_p)))
    # sampled ids stay inside the nucleus
    many = next_tokens(
        logits.expand(2000, 4), SamplingParams(1.0, top_p=0.8), torch.Generator().manual_seed(0)
    )
    assert set(many.tolist()) == {1, 3}
    share = (many == 1).float().mean().item()
    assert share == pytest.approx(0.5 / 0.8, abs=0.04)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # greedy under a strong penalty never repeats a token
    model = tiny("gpt2")
    out = decode(model, [[1, 2, 3]], 20, SamplingParams(temperature=0, repetition_penalty=1e6))[0]
    assert len(set(out)) == len(out) and not set(out) & {1, 2, 3}


def test_a_stop_id_ends_its_row_only():
    model = tiny("llama")
    free = decode(model, PROMPTS, 8, SamplingParams(temperature=0))
    stop = free[1][3]
    rows = decode(model, PROMPTS, 8, SamplingParams(temperature=0), stop_ids=[stop])
    assert rows[1] == free[1][: free[1].index(stop) + 1]
    for got, full in zip(rows, free):
        assert got == (full[: full.index(stop) + 1] if stop in full else full)


# ---------------------------------------------------------------------------------------------
# Text: incremental decoding and stop strings, with the session's real tokenizer


@pytest.fixture(scope="module")
def tokenizer(prepared_data):
    from llmtrain.data.tokenizer import load_tokenizer

    return load_tokenizer(prepared_data.data_dir)


def test_streamed_pieces_join_to_the_text_and_never_split_a_character(tokenizer):
    text = "ab ☃ ü xyz\nnew line ☃☃"
    stream = TextStream(tokenizer.decode, [tokenizer.bos_id])
    pieces = [stream.feed(t) for t in tokenizer.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "☃☃" in pieces[-1] or any("☃" in p for p in pieces)


def test_a_stop_string_ends_the_text_and_is_never_printed(tokenizer):
    text = "first part STOP here and more"
    for stop in (["STOP"], ["ST", "zzz"], [" here", "STO"]):
        stream = TextStream(tokenizer.decode, [tokenizer.bos_id], stop)
        printed = ""
        for t in tokenizer.encode(text):
            printed += stream.feed(t)
            if stream.stopped:
                break
        printed += stream.finish()
        cut = min(text.find(s) for s in stop if s in text)
        assert stream.stopped and printed == stream.text == text[:cut]


def test_a_tail_that_may_become_a_stop_string_waits_until_ruled_out():
    def chars(ids):
        return "".join(map(chr, ids))

    stream = TextStream(chars, stops=["cX", "bcY"])
    printed = "".join(stream.feed(ord(c)) for c in "zzabc")
    assert printed == "zza"  # "bc" could still become "bcY"
    assert stream.feed(ord("d")) == "bcd" and not stream.stopped
    assert stream.feed(ord("c")) == "" and stream.feed(ord("X")) == "" and stream.stopped
    assert stream.text == "zzabcd" and stream.finish() == ""


# ---------------------------------------------------------------------------------------------
# `llmtrain generate` end to end on the session's checkpoint


def _samples(out: str) -> dict[str, str]:
    blocks = out.split("--- ")[1:]
    return {b.split(" (checkpoint")[0]: b.split("---\n", 1)[1].rstrip("\n") for b in blocks}


def test_prompt_file_batches_give_the_same_samples_as_one_by_one_and_as_without_cache(
    trained, tmp_path, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "import"}, {"prompt": "def f(x):\n    return"}, {"prompt": "Ka"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    base = [
        *trained,
        f"generate.prompt_file={prompts}",
        "generate.max_new_tokens=10",
        "generate.num_samples=2",
    ]
    base += ["generate.top_p=0.9", "generate.repetition_penalty=1.2"]
    outputs = []
    for extra in (["generate.batch_size=6"], ["generate.batch_size=1"], ["generate.use_cache=false"]):
        assert cli_run("generate", [*base, *extra]) == 0
        outputs.append(_samples(capsys.readouterr().out))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(outputs[0]) == 6
    for p, record in enumerate(lines):
        for s in (1, 2):
            assert outputs[0][f"prompt {p + 1} of 3, sample {s} of 2"].startswith(record["prompt"])


def test_streaming_prints_what_the_batch_prints_and_a_stop_string_ends_it(trained, capsys, monkeypatch):
    base = [*trained, "generate.max_new_tokens=24", "generate.temperature=1", "generate.prompt=-"]
    monkeypatch.setattr("sys.stdin", io.StringIO("The\n"))
    assert cli_run("generate", [*base, "generate.stream=false"]) == 0
    plain = _samples(capsys.readouterr().out)["sample 1 of 1"]
    monkeypatch.setattr("sys.stdin", io.StringIO("The\n"))
    assert cli_run("generate", base) == 0  # one row: streams by default
    assert _samples(capsys.readouterr().out)["sample 1 of 1"] == plain
    continuation = plain[len("The") :]
    stop = continuation.split()[2][:2]  # the start of the third word: a stop in mid-text
    monkeypatch.setattr("sys.stdin", io.StringIO("The\n"))
    assert cli_run("generate", [*base, f"generate.stop=[{json.dumps(stop)}]"]) == 0
    stopped = _samples(capsys.readouterr().out)["sample 1 of 1"]
    assert stopped == "The" + continuation[: continuation.find(stop)]


BAD_VALUES = [
    ("top_p", 0.0, "generate.top_p: must be in (0, 1]"),
    ("top_p", 1.5, "generate.top_p: must be in (0, 1]"),
    ("repetition_penalty", -1.0, "generate.repetition_penalty: must be positive"),
    ("top_k", -3, "generate.top_k: must be >= 0"),
    ("temperature", -0.5, "generate.temperature: must be >= 0"),
    ("temperature", float("nan"), "generate.temperature: must be >= 0"),
    ("max_new_tokens", 0, "generate.max_new_tokens: must be at least 1"),
    ("stop", ["</s>", ""], "generate.stop[1]: must not be empty"),
    ("num_samples", 0, "generate.num_samples: must be at least 1"),
]


def test_bad_sampling_values_are_one_line_naming_the_key(prepared_data, tmp_path, capsys):
    from llmtrain.config import GenerateConfig, check_generate_config
    from llmtrain.errors import ConfigError

    for key, value, message in BAD_VALUES:
        with pytest.raises(ConfigError) as err:
            check_generate_config(GenerateConfig(**{key: value}))
        assert message in str(err.value) and "\n" not in str(err.value)
    # and through the command line, before anything loads
    assert cli_run("generate", [*prepared_data.overrides, f"run.dir={tmp_path}", "generate.top_p=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "generate.top_p: must be in (0, 1]" in err


def test_bad_prompt_files_and_a_prompt_longer_than_the_context_are_one_line(trained, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": "no end\n')
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "ok"}\n\n{"text": "hi"}\n')
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "ba " * 1500 + "\n")
    cases = [
        (empty, f"generate.prompt_file={empty}: the file holds no prompt"),
        (tmp_path / "missing.txt", "missing.txt: no such file"),
        (broken, f"{broken}:2: not valid JSON"),
        (wrong, f'{wrong}:3: a JSONL prompt line must be an object with a string "prompt"'),
        (long, f"{long}:2: prompt of "),
    ]
    for path, message in cases:
        assert cli_run("generate", [*trained, f"generate.prompt_file={path}"]) == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert captured.out == ""  # nothing half-written
    assert "leaves no room in model.max_seq_len=1024" in err


def test_sampling_params_refuse_values_outside_their_range():
    for kwargs in ({"top_p": 0.0}, {"top_p": 1.01}, {"top_k": -1}, {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def test_an_incomplete_checkpoint_is_one_line(prepared_data, tmp_path, capsys):
    step = tmp_path / "run" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "llmtrain_state.json").write_text('{"step": 3}')  # a save that never finished: no COMPLETE
    args = [*prepared_data.overrides, f"run.dir={tmp_path / 'run'}", f"generate.checkpoint={step}"]
    assert cli_run("generate", args) == 2
    captured = capsys.readouterr()
    assert (
        len(captured.err.strip().splitlines()) == 1 and "is incomplete (no COMPLETE marker)" in captured.err
    )
    assert captured.out == ""


def test_a_hugging_face_export_generates_what_its_checkpoint_generates(trained, tmp_path, capsys):
    from llmtrain.config import load_config
    from llmtrain.export import export_hf

    out = export_hf(load_config(trained), tmp_path / "hf")
    capsys.readouterr()
    args = [*trained, "generate.prompt=Ka", "generate.max_new_tokens=12", "generate.num_samples=2"]
    assert cli_run("generate", args) == 0
    ours = _samples(capsys.readouterr().out)
    assert cli_run("generate", [*args, f"generate.checkpoint={out}"]) == 0
    assert _samples(capsys.readouterr().out) == ours
