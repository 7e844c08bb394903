"""lm-evaluation-harness on our checkpoints: the adapter's numbers against direct computations, the
shipped tasks against brute-force scores, in-loop evaluation, and each bad input as one line."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from llmtrain.cli import run as cli_run  # noqa: E402
from llmtrain.config import CONFIG_DIR, load_config  # noqa: E402
from llmtrain.errors import ConfigError  # noqa: E402
from llmtrain.train.metrics import read_metrics  # noqa: E402

SHIPPED = ["llmtrain_mc", "llmtrain_qa", "llmtrain_translate"]
# a two-step run of the tiny model in this process (a world of one)
SHORT_RUN = [
    "debug=cpu",
    "model=tiny",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.max_steps=2",
    "train.val_every=0",
    "checkpoint.every_steps=2",
    "logging.every_steps=1",
    "logging.progress=false",
    "schedule.warmup_steps=1",
]


@pytest.fixture
def restore_env():
    """The trainer gives this process the env of a world of one; leave os.environ as we found it."""
    import os

    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def ours(trained):
    """(model, tokenizer) of the session's checkpoint, on the CPU."""
    from llmtrain.inference import load_checkpoint_model, load_matching_tokenizer

    loaded = load_checkpoint_model(load_config(trained), None, device=torch.device("cpu"))
    return loaded.model, load_matching_tokenizer(loaded)


@pytest.fixture
def run_copy(trained, tmp_path):
    """Overrides of a copy of the session's run (its checkpoints), for tests that write eval results."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(load_config(trained).run_dir / "checkpoints", run_dir / "checkpoints")
    return [*trained, f"run.dir={run_dir}"]


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct_loglikelihood(logits_of, tok, context: str, continuation: str, max_len: int):
    """Sum of log P(continuation tokens), with EOS before the text and the oldest tokens dropped to fit."""
    if context:
        whole = [tok.eos_id, *tok.encode(context + continuation)]
        n_cont = len(whole) - len([tok.eos_id, *tok.encode(context)])
    else:
        whole = [tok.eos_id, *tok.encode(continuation)]
        n_cont = len(whole) - 1
    whole = whole[-(max_len + 1) :]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(logits_of(ids)[0].double(), dim=-1)
    targets = whole[1:]
    picked = [logprobs[t, targets[t]].item() for t in range(len(targets) - n_cont, len(targets))]
    greedy = all(
        logprobs[t].argmax().item() == targets[t] for t in range(len(targets) - n_cont, len(targets))
    )
    return sum(picked), greedy


def _requests(tok):
    long_context = " ".join(f"word{i % 37} and" for i in range(900))  # past model.max_seq_len=1024 tokens
    assert len(tok.encode(long_context)) > 1100
    return [
        ("Question: what is two plus two?\nAnswer:", " four"),
        ("def add(a, b):\n    return", " a + b"),
        ("", "an empty context is conditioned on EOS alone"),
        ("The cat sat on the", " mat and then slept for a while"),
        (long_context, " the end"),
    ]


def test_loglikelihoods_equal_direct_computation_with_our_model_and_with_transformers(
    ours, trained, tmp_path
):
    from llmtrain.eval.lm_adapter import LlmtrainLM

    model, tok = ours
    lm = LlmtrainLM.from_model(model, tok, batch_size=2)  # two per batch: padding is exercised
    requests = _requests(tok)
    got = lm.loglikelihood(_instances("loglikelihood", requests), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(requests, got, strict=True):
        expected, exp_greedy = _direct_loglikelihood(model, tok, context, continuation, model.cfg.max_seq_len)
        assert score == pytest.approx(expected, abs=1e-5)
        assert greedy == exp_greedy

    transformers = pytest.importorskip("transformers")
    from llmtrain.export import export_hf

    out = export_hf(load_config(trained), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    for (context, continuation), (score, _) in zip(requests, got, strict=True):
        expected, _ = _direct_loglikelihood(
            lambda ids: hf(ids).logits, tok, context, continuation, model.cfg.max_seq_len
        )
        assert score == pytest.approx(expected, abs=1e-5)


def test_rolling_loglikelihood_scores_every_token_once_in_full_windows(ours):
    from llmtrain.eval.lm_adapter import LlmtrainLM

    model, tok = ours
    L = model.cfg.max_seq_len
    short = "A short text for perplexity."
    long = " ".join(f"token{i % 53}" for i in range(1500))
    lm = LlmtrainLM.from_model(model, tok, batch_size=4)
    got = lm.loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(short,), (long,)]), disable_tqdm=True
    )

    def score(inputs: list[int], targets: list[int]) -> float:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([inputs]))[0].double(), dim=-1)
        n = len(targets)
        return sum(logprobs[len(inputs) - n + i, t].item() for i, t in enumerate(targets))

    for text, total in zip((short, long), got, strict=True):
        tokens = tok.encode(text)
        first = min(L, len(tokens))
        expected = score([tok.eos_id, *tokens[: first - 1]], tokens[:first])  # first window: after EOS
        for start in range(L, len(tokens), L):  # then chunks of L, each after the L tokens before its end
            end = min(start + L, len(tokens))
            expected += score(tokens[end - L - 1 : end - 1], tokens[start:end])
        assert total == pytest.approx(expected, abs=1e-5)
    assert len(tok.encode(long)) > L


def test_generate_until_same_text_batched_alone_and_without_kv_cache(ours):
    from llmtrain.eval.lm_adapter import LlmtrainLM

    model, tok = ours
    prompts = ["def ", "import os\nimport", "Question: who?\nAnswer:", "x"]
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    requests = _instances("generate_until", [(p, dict(kwargs)) for p in prompts])
    batched = LlmtrainLM.from_model(model, tok, batch_size=4).generate_until(requests)
    alone = LlmtrainLM.from_model(model, tok, batch_size=1).generate_until(requests)
    no_cache = LlmtrainLM(
        model,
        tok,
        max_length=model.cfg.max_seq_len,
        vocab_size=model.vocab_size,
        device=torch.device("cpu"),
        batch_size=4,
    ).generate_until(requests)
    assert batched == alone == no_cache
    assert any(batched)

    # a stop string ends the text before it: the longest continuation, cut at its second word
    longest = max(batched, key=len)
    stop = longest.split()[1]
    prompt = prompts[batched.index(longest)]
    cut = LlmtrainLM.from_model(model, tok).generate_until(
        _instances("generate_until", [(prompt, {**kwargs, "until": [stop]})])
    )
    assert cut == [longest.split(stop)[0]] and len(cut[0]) < len(longest)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(ours):
    from llmtrain.eval.lm_adapter import LlmtrainLM

    model, tok = ours
    lm = LlmtrainLM.from_model(model, tok)
    tail = " and so on"
    long_prompt = " ".join(f"w{i % 29}" for i in range(1200)) + tail
    kwargs = {"until": ["\n"], "max_gen_toks": 8}
    (got,) = lm.generate_until(_instances("generate_until", [(long_prompt, kwargs)]))
    keep = [tok.eos_id, *tok.encode(long_prompt)][-(model.cfg.max_seq_len - 8) :]
    out = model.generate(torch.tensor([keep]), 8, temperature=0)[0, len(keep) :].tolist()
    if tok.eos_id in out:
        out = out[: out.index(tok.eos_id)]
    assert got == tok.decode(keep[-1:] + out)[len(tok.decode(keep[-1:])) :].split("\n")[0]


# ------------------------------------------------------------------------ brute-force task scores


def _normalize(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))


def _greedy(model, tok, prompt: str, until: list[str], max_new: int) -> str:
    """Plain greedy decoding by full forwards, cut at the first stop string."""
    ids = [tok.eos_id, *tok.encode(prompt)]
    new: list[int] = []
    text = ""
    for _ in range(max_new):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + new]))[0, -1, : model.vocab_size].argmax())
        if token == tok.eos_id:
            break
        new.append(token)
        text = tok.decode(ids[-1:] + new)[len(tok.decode(ids[-1:])) :]
        if any(u in text for u in until):
            break
    for u in until:
        text = text.split(u)[0]
    return text


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shipped_tasks_score_exactly_what_brute_force_gives(ours, run_copy, capsys):
    import sacrebleu

    model, tok = ours
    args = [
        *run_copy,
        f"eval.tasks=[{','.join(SHIPPED)}]",
        "eval.worst=2",
        "eval.bootstrap_iters=0",
        "eval.batch_size=3",
    ]
    assert cli_run("eval", args) == 0
    out = capsys.readouterr().out
    folder = load_config(run_copy).run_dir / "eval" / "6"
    results = json.loads((folder / "results.json").read_text())["results"]
    L = model.cfg.max_seq_len

    docs = _jsonl(CONFIG_DIR / "eval" / "llmtrain_mc" / "mc.jsonl")
    acc = acc_norm = 0
    for doc in docs:
        prompt = f"Question: {doc['question']}\nAnswer:"
        lls = [_direct_loglikelihood(model, tok, prompt, f" {c}", L)[0] for c in doc["choices"]]
        acc += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm += max(range(len(lls)), key=normed.__getitem__) == doc["answer"]
    assert results["llmtrain_mc"]["acc,none"] == pytest.approx(acc / len(docs), abs=1e-12)
    assert results["llmtrain_mc"]["acc_norm,none"] == pytest.approx(acc_norm / len(docs), abs=1e-12)

    docs = _jsonl(CONFIG_DIR / "eval" / "llmtrain_qa" / "qa.jsonl")
    em = f1 = 0.0
    for doc in docs:
        pred = _greedy(model, tok, f"{doc['context']}\nQuestion: {doc['question']}\nAnswer:", ["\n", "."], 16)
        em += max(float(_normalize(pred) == _normalize(a)) for a in doc["answers"])
        f1 += max(_f1(pred, a) for a in doc["answers"])
    assert results["llmtrain_qa"]["exact_match,none"] == pytest.approx(em / len(docs), abs=1e-12)
    assert results["llmtrain_qa"]["f1,none"] == pytest.approx(f1 / len(docs), abs=1e-12)

    docs = _jsonl(CONFIG_DIR / "eval" / "llmtrain_translate" / "translate.jsonl")
    preds = [_greedy(model, tok, f"English: {d['source']}\nFrench:", ["\n"], 16) for d in docs]
    bleu = sacrebleu.corpus_bleu(preds, [[f" {d['target']}" for d in docs]]).score
    assert results["llmtrain_translate"]["bleu,none"] == pytest.approx(bleu, abs=1e-9)

    # lm-eval's table on stdout, every example in the samples files, the worst two per task printed
    assert "|llmtrain_mc" in out and "acc_norm" in out and "bleu" in out
    for task in SHIPPED:
        assert len(_jsonl(folder / f"samples_{task}.jsonl")) == 8
        assert out.count(f"of {task} (lowest") == 1
    assert out.count("  expected: ") == 6 and "lowest log-likelihood of the right answer" in out
    assert not folder.with_name("6.tmp").exists()


def test_registered_model_loads_a_checkpoint_by_name(ours, trained):
    from lm_eval.api.registry import get_model

    from llmtrain.eval.evaluate import register_lm_eval_model
    from llmtrain.eval.lm_adapter import LlmtrainLM

    register_lm_eval_model()
    from llmtrain.train.checkpoint import complete_checkpoints

    checkpoint = complete_checkpoints(load_config(trained).run_dir)[0]
    lm = get_model("llmtrain").create_from_arg_string(f"checkpoint={checkpoint}", {"device": "cpu"})
    model, tok = ours
    requests = _instances("loglikelihood", _requests(tok)[:2])
    assert lm.loglikelihood(requests) == LlmtrainLM.from_model(model, tok).loglikelihood(requests)


@pytest.mark.slow
def test_eval_summary_goes_to_an_offline_wandb_run(run_copy, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = [*run_copy, "eval.tasks=[llmtrain_mc]", "eval.limit=3", "eval.registry=false"]
    assert cli_run("eval", [*args, "logging.wandb.mode=offline"]) == 0
    (log,) = (load_config(run_copy).run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = log.read_bytes()
    assert b"eval/llmtrain_mc/acc_norm" in data and b"checkpoint_step" in data


# ---------------------------------------------------------------------------- in-loop evaluation


def test_in_loop_eval_logs_each_task_metric_and_matches_offline_eval(
    prepared_data, tmp_path, capsys, restore_env
):
    run_dir = tmp_path / "run"
    overrides = [
        *prepared_data.overrides,
        *SHORT_RUN,
        "train.eval_tasks=[llmtrain_mc,llmtrain_qa]",
        "train.eval_every=2",
        "eval.limit=4",
        f"run.dir={run_dir}",
    ]
    assert cli_run("train", overrides) == 0
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval/llmtrain_mc/acc" in r]
    assert [r["step"] for r in records] == [2]
    (record,) = records
    assert record["eval_s"] > 0 and record["eval_forwards"] > 0
    assert 0 <= record["eval/llmtrain_mc/acc_norm"] <= 1
    assert "downstream eval" in capsys.readouterr().out

    # the same documents through `llmtrain eval` on the step-2 checkpoint: the same scores
    # the same documents through `llmtrain eval` on the step-2 checkpoint (KV-cache decoding there,
    # full forwards through the engine here): the same scores
    assert (
        cli_run("eval", [*overrides, "eval.tasks=[llmtrain_mc,llmtrain_qa]", "eval.bootstrap_iters=0"]) == 0
    )
    offline = json.loads((run_dir / "eval" / "2" / "results.json").read_text())["results"]
    for task, metric in [("llmtrain_mc", "acc"), ("llmtrain_mc", "acc_norm"), ("llmtrain_qa", "f1")]:
        assert record[f"eval/{task}/{metric}"] == offline[task][f"{metric},none"]


# ------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_task_name_is_one_line_with_a_suggestion(trained, capsys):
    assert cli_run("eval", [*trained, "eval.tasks=[llmtrain_mcq]", "eval.registry=false"]) == 2
    err = _one_line_error(capsys)
    assert "unknown task 'llmtrain_mcq'" in err and "did you mean llmtrain_mc" in err


def _user_task(folder: Path, lines: list[str], generation: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text("".join(line + "\n" for line in lines))
    kind = "generate_until" if generation else "multiple_choice"
    body = (
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n"
        f"test_split: test\noutput_type: {kind}\ndoc_to_text: '{{{{q}}}}'\ndoc_to_target: a\n"
    )
    body += (
        generation
        or "doc_to_choice: c\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (folder / "my_task.yaml").write_text(body)
    return folder


def test_malformed_task_jsonl_line_is_named_by_file_and_line(run_copy, tmp_path, capsys):
    good = json.dumps({"q": "x?", "c": ["a", "b"], "a": 0})
    folder = _user_task(tmp_path / "tasks", [good, good, '{"q": "broken", "c": ['])
    args = [*run_copy, "eval.tasks=[my_task]", f"eval.include_path={folder}", "eval.registry=false"]
    assert cli_run("eval", args) == 2
    err = _one_line_error(capsys)
    assert f"{folder / 'data.jsonl'}:3: not valid JSON" in err
    assert not (load_config(run_copy).run_dir / "eval").exists()


def test_user_task_relative_data_file_resolves_next_to_its_yaml(run_copy, tmp_path, monkeypatch):
    rows = [json.dumps({"q": f"q{i}?", "c": ["yes", "no"], "a": i % 2}) for i in range(3)]
    folder = _user_task(tmp_path / "tasks", rows)
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    args = [*run_copy, "eval.tasks=[my_task]", f"eval.include_path={folder}", "eval.registry=false"]
    assert cli_run("eval", [*args, "eval.bootstrap_iters=0"]) == 0
    results = json.loads((load_config(run_copy).run_dir / "eval" / "6" / "results.json").read_text())
    assert results["n-samples"]["my_task"]["effective"] == 3


def test_max_gen_toks_that_leaves_no_room_for_the_prompt_is_one_line(run_copy, tmp_path, capsys):
    generation = "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 5000\n"
    folder = _user_task(tmp_path / "tasks", [json.dumps({"q": "x", "a": "y"})], generation=generation)
    args = [*run_copy, "eval.tasks=[my_task]", f"eval.include_path={folder}", "eval.registry=false"]
    assert cli_run("eval", args) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # DeepSpeed narrates the weights' loading first
    (err,) = [line for line in lines if line.startswith("llmtrain eval: error:")]
    assert err == lines[-1]
    assert "max_gen_toks=5000" in err and "model.max_seq_len=1024" in err
    assert not (load_config(run_copy).run_dir / "eval").exists()


def test_eval_tasks_without_a_checkpoint_is_one_line(prepared_data, tmp_path, capsys):
    args = [*prepared_data.overrides, f"run.dir={tmp_path / 'empty'}", "eval.tasks=[llmtrain_mc]"]
    assert cli_run("eval", [*args, "eval.registry=false"]) == 2
    err = _one_line_error(capsys)
    assert "no complete checkpoint" in err and str(tmp_path / "empty") in err


def test_unknown_in_loop_task_stops_training_before_the_first_step(
    prepared_data, tmp_path, capsys, restore_env
):
    run_dir = tmp_path / "run"
    args = [*prepared_data.overrides, *SHORT_RUN, f"run.dir={run_dir}", "train.eval_tasks=[nope_task]"]
    assert cli_run("train", [*args, "train.eval_every=2", "eval.registry=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train.eval_tasks: unknown task 'nope_task'" in err
    assert not (run_dir / "checkpoints").exists()


def test_in_loop_eval_keys_are_checked_together():
    with pytest.raises(ConfigError, match="train.eval_every: 5 needs train.eval_tasks"):
        load_config(["train.eval_every=5"])
    with pytest.raises(ConfigError, match="train.eval_tasks: are set but train.eval_every=0"):
        load_config(["train.eval_tasks=[llmtrain_mc]"])
    with pytest.raises(ConfigError, match="eval.worst"):
        load_config(["eval.worst=-1"])


def test_missing_lm_eval_is_one_clear_line(prepared_data, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when not installed
    args = [*prepared_data.overrides, f"run.dir={tmp_path / 'run'}", "eval.tasks=[llmtrain_mc]"]
    assert cli_run("eval", args) == 2
    err = _one_line_error(capsys)
    assert "needs lm-evaluation-harness" in err and "pip install -e .[eval]" in err
