"""eval / generate / export of a checkpoint trained here, in this process (a world of one)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llmtrain.cli import run as cli_run
from llmtrain.config import load_config
from llmtrain.errors import ConfigError
from llmtrain.train.metrics import read_metrics


def test_eval_reproduces_the_trainers_validation_loss(trained, capsys):
    """Same checkpoint, same validation batches: the plain model must give the engine's loss."""
    cfg = load_config(trained)
    logged = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if "val_loss" in r][-1]
    assert cli_run("eval", [*trained, "eval.micro_batch_size=4", "eval.max_batches=2"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)
    assert result["step"] == 6
    assert result["val_loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    for source in ("books", "web"):
        assert result[f"val/{source}/bpb"] > 0


def test_generate_is_seeded_and_starts_with_the_prompt(trained, capsys):
    args = [*trained, "generate.prompt=import", "generate.max_new_tokens=12", "generate.num_samples=2"]
    assert cli_run("generate", args) == 0
    first = capsys.readouterr().out
    assert cli_run("generate", args) == 0
    assert capsys.readouterr().out == first
    samples = [block.split("\n", 1)[1] for block in first.split("--- sample ")[1:]]
    assert len(samples) == 2
    assert all(s.startswith("import") for s in samples)


def test_export_loads_in_transformers_with_identical_logits_and_tokens(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.export import export_hf
    from llmtrain.inference import load_checkpoint_model

    cfg = load_config(trained)
    out = export_hf(cfg, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_checkpoint_model(cfg, None, device=torch.device("cpu")).model
    ids = torch.randint(0, cfg.model.vocab_size or 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)[..., : hf_model.config.vocab_size]
        got = hf_model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer(cfg.data_dir)
    text = "def f(x):\n    return  x * 2  # ünïcode ☃\n"
    assert hf_tok(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]
    assert json.loads((out / "llmtrain.json").read_text())["tokenizer_hash"] == tok.hash


def test_generate_without_checkpoint_is_one_clear_line(prepared_data, tmp_path, capsys):
    rc = cli_run("generate", [*prepared_data.overrides, f"run.dir={tmp_path / 'empty'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert "no complete checkpoint" in err and str(tmp_path / "empty") in err


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(trained, tmp_path, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert cli_run("export", [*trained, f"export.out={precious}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"export.out={precious}" in err
    assert (precious / "todo.txt").read_text() == "keep me"
    assert not precious.with_name("notes.tmp").exists()


def test_init_from_an_export_starts_from_its_weights(trained, tmp_path):
    """`train.init_from=<hf folder>`: a fresh run whose weights are the export's (loaded from
    safetensors), so its loss at step 0 is the trained model's, not a random init's."""
    from llmtrain.export import export_hf
    from llmtrain.inference import load_checkpoint_model
    from llmtrain.train.trainer import Trainer

    out = export_hf(load_config(trained), tmp_path / "hf")
    exported = load_checkpoint_model(load_config(trained), None, device=torch.device("cpu")).model
    saved = dict(os.environ)
    try:
        from llmtrain.distributed import runtime

        cfg = load_config([*trained, f"run.dir={tmp_path / 'finetune'}", f"train.init_from={out}"])
        trainer = Trainer(cfg, runtime.init_distributed())
        weights = trainer.backend.module.state_dict()
        for name, tensor in exported.state_dict().items():
            torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
        trainer.metrics.close()
        bad = load_config(
            [*trained, f"run.dir={tmp_path / 'bad'}", f"train.init_from={out}", "model.n_layers=3"]
        )
        with pytest.raises(ConfigError, match=r"train.init_from=.*: model.n_layers is 2 there but 3"):
            Trainer(bad, runtime.init_distributed())
    finally:
        os.environ.clear()
        os.environ.update(saved)
