"""Chat data for supervised fine-tuning: conversations become shards with a loss mask, verified like
the tokens, read back by the loader as ignored targets (zero loss, zero gradient), resumable; the
Hugging Face export renders the same ids; every bad input is one line naming its file and line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llmtrain.config import load_config
from llmtrain.data.batch import batch_to_device
from llmtrain.data.chat_template import render_conversation, render_prompt
from llmtrain.data.corpus import split_of
from llmtrain.data.loader import build_train_loader, build_val_loader
from llmtrain.data.prepare import prepare
from llmtrain.data.shards import ShardReader, list_shards, mask_path
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import DataError
from llmtrain.model.transformer import IGNORE_INDEX

CHAT_FILE = Path(__file__).resolve().parents[2] / "configs" / "data" / "chat_example" / "train.jsonl"


def chat_sources(chat: Path, web: Path | None = None, chat_format: str = "chat") -> str:
    items = [f"{{name:chat,path:'{chat}',format:{chat_format},weight:1.0}}"]
    if web is not None:
        items.append(f"{{name:web,path:'{web}',format:jsonl,text_field:text,weight:1.0}}")
    return "data.sources=[" + ",".join(items) + "]"


def chat_overrides(data_dir: Path, tokenizer: Path, sources: str, *extra: str) -> list[str]:
    return [
        f"data.dir={data_dir}",
        sources,
        "data.val_fraction=0.2",
        f"tokenizer.path={tokenizer}",
        "prepare.shard_tokens=2000",
        "prepare.workers=1",
        "prepare.progress=false",
        "model=tiny",
        "model.doc_mask=true",
        "train.seq_len=64",
        "train.micro_batch_size=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def chat_data(prepared_data, tmp_path_factory):
    """The shipped chat corpus and the session corpus's web source, prepared with the session tokenizer
    (which reserves the chat tokens by default); small shards, so windows cross shard ends."""
    data_dir = tmp_path_factory.mktemp("sft") / "data"
    web = prepared_data.corpus_dir / "web.jsonl"
    overrides = chat_overrides(
        data_dir, prepared_data.data_dir / "tokenizer.model", chat_sources(CHAT_FILE, web)
    )
    prepare(load_config(overrides))
    return overrides


def conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in CHAT_FILE.read_text().splitlines()]


def test_shipped_chat_corpus_is_valid_and_small():
    convs = conversations()
    assert 100 <= len(convs) <= 300 and CHAT_FILE.stat().st_size < 300_000
    assert all(any(m["role"] == "assistant" for m in c) for c in convs)


def test_chat_shards_hold_each_conversation_with_its_trained_flags(chat_data):
    cfg = load_config(chat_data)
    tok = load_tokenizer(cfg.data_dir)
    expected = {"train": [], "val": []}
    for line, messages in enumerate(conversations(), 1):
        expected[split_of(f"{CHAT_FILE.name}:{line}", 0.2)].append(render_conversation(messages, tok))
    for split, docs in expected.items():
        got = []
        prefixes = list_shards(cfg.data_dir, "chat", split)
        assert len(prefixes) > (1 if split == "train" else 0)
        for prefix in prefixes:
            reader = ShardReader(prefix, vocab_size=tok.vocab_size, tokenizer_hash=tok.hash)
            reader.verify()
            assert reader.has_mask and reader.version == 2
            offs = reader.doc_offsets
            for a, b in zip(offs[:-1], offs[1:]):
                ids, mask = np.asarray(reader.tokens[a:b]), np.asarray(reader.mask[a:b])
                got.append((ids.tolist(), mask.tolist()))
        # each conversation, then EOS (never trained on)
        assert got == [(ids + [tok.eos_id], [int(t) for t in flags] + [0]) for ids, flags in docs]


def test_pretraining_shards_are_unchanged_by_masks(chat_data):
    cfg = load_config(chat_data)
    for prefix in list_shards(cfg.data_dir, "web", "train"):
        reader = ShardReader(prefix)
        assert not reader.has_mask and reader.version == 1 and not mask_path(prefix).exists()
        assert prefix.with_name(prefix.name + ".idx").read_bytes()[8:12] == (1).to_bytes(4, "little")


def test_damaged_loss_mask_is_one_line_naming_the_file(chat_data, tmp_path):
    from llmtrain.data.verify import shards_to_verify, start_verification

    src = load_config(chat_data).data_dir
    data_dir = tmp_path / "data"
    shutil.copytree(src, data_dir)
    prefix = list_shards(data_dir, "chat", "train")[0]
    mask = mask_path(prefix)
    raw = bytearray(mask.read_bytes())
    raw[5] ^= 1
    mask.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_00000\.mask\.bin: loss mask checksum mismatch"):
        ShardReader(prefix).verify()
    result = start_verification(shards_to_verify(data_dir, ["chat"]), mode="full").wait()
    assert "loss mask checksum mismatch" in result.error and result.bad_shards == (str(prefix),)
    mask.write_bytes(bytes(raw[:-3]))
    with pytest.raises(
        DataError, match=rf"mask\.bin: {len(raw) - 3} bytes, expected {len(raw)} \(truncated\)"
    ):
        ShardReader(prefix)
    mask.unlink()
    with pytest.raises(DataError, match=r"mask\.bin: loss mask missing \(its index lists one\)"):
        ShardReader(prefix)


def test_loader_masks_untrained_targets_and_resumes_identically(chat_data):
    cfg = load_config(chat_data)
    loader = build_train_loader(cfg, 0, 1)
    src_of = loader.sample_sources(np.arange(64))[0]
    assert set(src_of.tolist()) == {0, 1}  # both sources in the first batches
    batches = [loader.next_batch() for _ in range(16)]
    state = loader.state_dict()
    following = [loader.next_batch() for _ in range(3)]
    seen_masked = False
    for i, batch in enumerate(batches):
        ks = np.arange(i * 4, i * 4 + 4)
        src, starts = loader.window_starts(ks)
        mask = batch["loss_mask"].numpy()
        for row, (s, start) in enumerate(zip(src.tolist(), starts.tolist())):
            if s == 1:  # the plain source: every target is trained on
                assert mask[row].all()
            else:
                expected = loader.streams[0].read_mask(np.array([start]), cfg.train.seq_len + 1)[0]
                assert (mask[row] == expected).all() and mask[row].sum() < mask.shape[1]
                seen_masked |= bool(mask[row].any())
        _, targets, _ = batch_to_device(batch, torch.device("cpu"), True)
        ignored = batch["loss_mask"][:, 1:] == 0
        assert (targets[ignored] == IGNORE_INDEX).all()
        assert (targets[~ignored] == batch["tokens"][:, 1:][~ignored]).all()
    assert seen_masked
    again = build_train_loader(cfg, 0, 1)
    again.load_state_dict(state)
    for a, b in zip(following, (again.next_batch() for _ in range(3))):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_val_batches_of_chat_sources_carry_the_mask(chat_data):
    val = build_val_loader(load_config(chat_data), 0, 1)
    chat = list(val.batches("chat"))
    assert chat and all("loss_mask" in b for b in chat)
    assert all("loss_mask" not in b for b in val.batches("web"))


def test_prompt_targets_contribute_zero_loss_and_zero_gradient(chat_data):
    from llmtrain.model import build_model

    cfg = load_config([*chat_data, "train.micro_batch_size=8"])
    cfg.model.vocab_size = load_tokenizer(cfg.data_dir).vocab_size
    batch = build_train_loader(cfg, 0, 1).read_samples(np.arange(200, 208))
    trained = batch["loss_mask"][:, 1:].bool()
    assert 0 < trained.sum() < trained.numel()
    torch.manual_seed(0)
    model = build_model(cfg.model)

    def loss_and_grads(tokens):
        model.zero_grad()
        inputs, targets, doc_ids = batch_to_device({**batch, "tokens": tokens}, torch.device("cpu"), True)
        loss = model(batch["tokens"][:, :-1], targets, batch["doc_ids"][:, :-1])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()], targets

    loss, grads, targets = loss_and_grads(batch["tokens"])
    # other ids at every untrained target (inputs unchanged): the same loss and gradients, bit for bit
    changed = batch["tokens"].clone()
    targets_view = changed[:, 1:]
    targets_view[~trained] = (targets_view[~trained] + 7) % cfg.model.vocab_size
    loss2, grads2, _ = loss_and_grads(changed)
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    # the loss is the mean cross-entropy over the trained targets alone; untrained logits get no gradient
    inputs = batch["tokens"][:, :-1]
    model.zero_grad()
    logits = model(inputs, None, batch["doc_ids"][:, :-1]).float()
    logits.retain_grad()
    picked = torch.nn.functional.cross_entropy(logits[trained], batch["tokens"][:, 1:][trained].long())
    torch.testing.assert_close(picked, loss, rtol=1e-6, atol=1e-6)
    torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX
    ).backward()
    assert (logits.grad[~trained] == 0).all() and (logits.grad[trained] != 0).any()


def test_hf_export_chat_template_renders_our_ids(prepared_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmtrain.export import _write_tokenizer

    tok = load_tokenizer(prepared_data.data_dir)
    _write_tokenizer(tok, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)

    def ids(encoded):
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    convs = conversations()
    for messages in convs:
        assert ids(hf.apply_chat_template(messages, tokenize=True)) == render_conversation(messages, tok)[0]
    history = convs[1][:-1]
    prompt = hf.apply_chat_template(history, tokenize=True, add_generation_prompt=True)
    assert ids(prompt) == render_prompt(history, tok)


@pytest.fixture(scope="module")
def plain_tokenizer(prepared_data, tmp_path_factory):
    """A tokenizer trained without the chat tokens (tokenizer.user_defined_symbols=[])."""
    from llmtrain.data.config import TokenizerConfig
    from llmtrain.data.tokenizer import train_tokenizer

    texts = [p.read_text() for p in sorted((prepared_data.corpus_dir / "books").iterdir())[:6]]
    cfg = TokenizerConfig(vocab_size=400, user_defined_symbols=[])
    return train_tokenizer(cfg, texts, tmp_path_factory.mktemp("plain") / "tok")


def test_export_of_a_tokenizer_without_chat_tokens_has_no_template(plain_tokenizer, tmp_path):
    from llmtrain.export import _write_tokenizer

    _write_tokenizer(plain_tokenizer, tmp_path)
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())


# ---- bad input: one line naming the file and line, nothing written ---------------------------------

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', r"malformed JSON \(Expecting value at column \d+\)"),
        ('["messages"]', r"expected a JSON object, got list"),
        ('{"text": "hi"}', r"no field 'messages' \(a chat record is"),
        ('{"messages": []}', r"'messages' must be a non-empty list of messages, got an empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r"message 0: unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', r"the conversation has no assistant turn"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}',
            r"message 1: empty content",
        ),
    ],
)
def test_bad_chat_line_is_one_line_naming_file_and_line(tmp_path, line, problem):
    from llmtrain.data.config import SourceConfig
    from llmtrain.data.corpus import iter_documents

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=rf"^{chat}:2: {problem}.*data\.on_bad_record=skip") as err:
        list(iter_documents(SourceConfig(name="chat", path=str(chat), format="chat")))
    assert "\n" not in str(err.value)


def test_bad_chat_line_stops_prepare_with_no_shard_written(prepared_data, tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text((json.dumps(GOOD) + "\n") * 80 + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    overrides = chat_overrides(
        tmp_path / "data", prepared_data.data_dir / "tokenizer.model", chat_sources(chat)
    )
    with pytest.raises(DataError, match=rf"^{chat}:81: message 0: unknown role 'robot'"):
        prepare(load_config(overrides))
    assert not list_shards(tmp_path / "data", "chat", "train")
    assert not (tmp_path / "data" / "shards" / "chat" / "done.json").exists()


def test_bad_chat_lines_are_counted_and_skipped_on_request(prepared_data, tmp_path):
    chat = tmp_path / "chat.jsonl"
    bad = [
        '{"messages": [{"role": "bot", "content": "x"}]}',
        "{oops",
        '{"messages": [{"role": "user", "content": "a"}]}',
    ]
    chat.write_text("\n".join([json.dumps(GOOD)] * 6 + bad) + "\n")
    overrides = chat_overrides(
        tmp_path / "data",
        prepared_data.data_dir / "tokenizer.model",
        chat_sources(chat),
        "data.on_bad_record=skip",
        "data.val_fraction=0",
    )
    prepare(load_config(overrides))
    done = json.loads((tmp_path / "data" / "shards" / "chat" / "done.json").read_text())
    assert done["skipped_records"] == 3 and done["splits"]["train"]["docs"] == 6
    assert done["bad_examples"] == [f"{chat}:7", f"{chat}:8", f"{chat}:9"]


def test_tokenizer_without_chat_tokens_fails_before_any_shard(plain_tokenizer, tmp_path):
    overrides = chat_overrides(tmp_path / "data", plain_tokenizer.path, chat_sources(CHAT_FILE))
    with pytest.raises(
        DataError, match=r"data source 'chat' \(format chat\), tokenizer .*lacks the chat tokens"
    ) as e:
        prepare(load_config(overrides))
    assert "tokenizer.user_defined_symbols" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data" / "shards").exists()


def test_training_a_chat_source_without_masks_is_refused_at_start(chat_data):
    """A source declared chat whose shards were made from plain text would train on every token."""
    cfg = load_config(chat_data)
    web = cfg.data.sources[1]
    cfg.data.sources = [type(web)(name="web", path=web.path, format="chat")]
    with pytest.raises(
        DataError, match=r"shards/web: source 'web' is format chat but its shards have no loss mask"
    ):
        build_train_loader(cfg, 0, 1)
