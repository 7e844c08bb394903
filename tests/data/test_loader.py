"""The mixture loader: windows, document ids, determinism, resume across world sizes, validation walk.

Synthetic shards make every token its own stream position (plus a per-source base), so a window's
first token says exactly which source and which stream offset it was cut from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmtrain.config import Config, batch_layout, load_config
from llmtrain.data.config import SourceConfig
from llmtrain.data.loader import (
    MIX_BLOCK,
    TrainLoader,
    ValLoader,
    build_train_loader,
    build_val_loader,
    permute,
)
from llmtrain.data.shards import ShardWriter, shard_prefix
from llmtrain.errors import DataError, UserError

VOCAB = 60_000
HASH = "f" * 64
BASE = {"a": 0, "b": 30_000}
T = 16


def write_split(data_dir, source, split, num_tokens, shard_tokens, seed=0):
    """Shards whose tokens are BASE + stream position; random document lengths. Returns doc starts."""
    rng = np.random.default_rng(seed)
    stream = BASE[source] + np.arange(num_tokens)
    starts, pos, shard, writer = [], 0, 0, None
    while pos < num_tokens:
        if writer is None:
            writer = ShardWriter(shard_prefix(data_dir, source, split, shard), VOCAB, HASH)
        n = min(int(rng.integers(1, 40)), num_tokens - pos)
        starts.append(pos)
        writer.add_document(stream[pos : pos + n], num_bytes=3 * n)
        pos += n
        if writer.num_tokens >= shard_tokens or pos == num_tokens:
            writer.close()
            writer, shard = None, shard + 1
    return np.array(starts)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    (d / "tokenizer.json").write_text(json.dumps({"vocab_size": VOCAB, "hash": HASH, "model_type": "bpe"}))
    doc_starts = {
        "a": write_split(d, "a", "train", 5001, 1200, seed=1),
        "b": write_split(d, "b", "train", 20_000, 7000, seed=2),
    }
    write_split(d, "a", "val", 300, 100, seed=3)
    write_split(d, "b", "val", 10, 100, seed=4)  # shorter than one window: no val batches
    return d, doc_starts


SOURCES = [SourceConfig(name="a", path="-", weight=1.0), SourceConfig(name="b", path="-", weight=3.0)]


def make_loader(data_dir, **kw):
    args = dict(seq_len=T, micro_batch_size=2, global_batch_size=8, vocab_size=VOCAB, tokenizer_hash=HASH)
    args.update(kw)
    return TrainLoader(data_dir, SOURCES, **args)


def global_steps(data_dir, world_size, steps, state=None, **kw):
    """Each step's global batch, as the concatenation of every rank's micro-batches in rank order."""
    loaders = [make_loader(data_dir, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    out = []
    for _ in range(steps):
        parts = []
        for loader in loaders:
            parts += [loader.next_batch()["tokens"] for _ in range(loader.grad_accum_steps)]
        out.append(torch.cat(parts))
    states = {json.dumps(loader.state_dict()) for loader in loaders}
    assert len(states) == 1  # every rank agrees on the position
    return out, loaders[0].state_dict()


def test_permute_is_a_bijection_and_depends_on_key():
    for n in [1, 2, 3, 7, 64, 1000, 4097]:
        p = permute(np.arange(n), n, 5)
        assert sorted(p.tolist()) == list(range(n))
    a, b = permute(np.arange(500), 500, 1), permute(np.arange(500), 500, 2)
    assert (a != b).mean() > 0.9


def test_batch_shapes_and_dtypes(data):
    batch = make_loader(data[0]).next_batch()
    assert batch["tokens"].dtype == torch.int32 and batch["tokens"].shape == (2, T + 1)
    assert batch["doc_ids"].dtype == torch.int32 and batch["doc_ids"].shape == (2, T + 1)
    # without doc_mask nothing reads the document ids: they are not built
    plain = make_loader(data[0], doc_ids=False).next_batch()
    assert set(plain) == {"tokens"} and torch.equal(plain["tokens"], batch["tokens"])
    many = np.arange(3000)  # windows across shard boundaries too
    with_ids = make_loader(data[0]).read_samples(many)["tokens"]
    assert torch.equal(make_loader(data[0], doc_ids=False).read_samples(many)["tokens"], with_ids)


def test_windows_are_stream_slices_on_the_window_grid(data):
    loader = make_loader(data[0])
    tokens = loader.read_samples(np.arange(3000))["tokens"].numpy()
    src = (tokens[:, 0] >= BASE["b"]).astype(int)
    start = tokens[:, 0] - np.where(src, BASE["b"], BASE["a"])
    # consecutive positions, also where a window crosses a shard boundary
    np.testing.assert_array_equal(tokens, tokens[:, :1] + np.arange(T + 1))
    assert (start % T == 0).all()
    np.testing.assert_array_equal(src, loader.sample_sources(np.arange(3000))[0])
    bounds = loader.streams[0].starts[1:-1]
    assert len(bounds) == 4
    crosses = [(src_ == 0) and ((bounds > s) & (bounds <= s + T)).any() for src_, s in zip(src, start)]
    assert sum(crosses) >= 3


def check_doc_ids(tokens, doc_ids, doc_starts):
    for row, ids in zip(tokens, doc_ids):
        src = "b" if row[0] >= BASE["b"] else "a"
        is_start = np.isin(row - BASE[src], doc_starts[src])
        is_start[0] = False
        np.testing.assert_array_equal(ids, np.cumsum(is_start))


def test_doc_ids_count_document_starts_inside_the_window(data):
    data_dir, doc_starts = data
    loader = make_loader(data_dir)
    batch = loader.read_samples(np.arange(500))
    assert (batch["doc_ids"][:, 0] == 0).all() and batch["doc_ids"].max() > 0
    check_doc_ids(batch["tokens"].numpy(), batch["doc_ids"].numpy(), doc_starts)
    # windows straddling each shard boundary (the next shard's first token starts a document)
    stream = loader.streams[0]
    starts = np.concatenate([b - np.arange(1, T + 1) for b in stream.starts[1:-1]])
    tokens, doc_ids = stream.read(starts, T + 1)
    np.testing.assert_array_equal(tokens, starts[:, None] + np.arange(T + 1))
    check_doc_ids(tokens, doc_ids, doc_starts)


def test_one_epoch_visits_every_window_once_then_reshuffles(data):
    loader = TrainLoader(
        data[0], SOURCES[:1], seq_len=T, micro_batch_size=1, global_batch_size=1, vocab_size=VOCAB
    )
    windows = int(loader.windows[0])
    assert windows == (5001 - 1) // T
    src, starts = loader.window_starts(np.arange(2 * windows))
    first, second = starts[:windows], starts[windows:]
    np.testing.assert_array_equal(np.sort(first), np.arange(windows) * T)
    np.testing.assert_array_equal(np.sort(second), np.arange(windows) * T)
    assert (first != second).mean() > 0.9
    assert loader.epochs_per_source(2 * windows) == {"a": 2.0}


def test_same_seed_gives_same_samples_other_seed_differs(data):
    a = make_loader(data[0]).read_samples(np.arange(64))["tokens"]
    b = make_loader(data[0]).read_samples(np.arange(64))["tokens"]
    c = make_loader(data[0], seed=99).read_samples(np.arange(64))["tokens"]
    assert torch.equal(a, b)
    assert (a[:, 0] != c[:, 0]).float().mean() > 0.8


def test_mixture_proportions_match_weights(data):
    loader = make_loader(data[0])
    n = 40_000
    src, _ = loader.sample_sources(np.arange(n))
    share_b = (src == 1).mean()
    sigma = np.sqrt(0.75 * 0.25 / n)
    assert abs(share_b - 0.75) < 4 * sigma
    # and exactly by weight over a whole mixing block (the order inside a block is shuffled)
    assert loader.samples_per_source(MIX_BLOCK) == {"a": MIX_BLOCK // 4, "b": 3 * MIX_BLOCK // 4}
    next_src, _ = loader.sample_sources(np.arange(MIX_BLOCK, MIX_BLOCK + n))
    assert loader.samples_per_source(MIX_BLOCK + n) == {
        "a": MIX_BLOCK // 4 + int((next_src == 0).sum()),
        "b": 3 * MIX_BLOCK // 4 + int((next_src == 1).sum()),
    }
    # the tokens agree with the schedule: source b's windows come from b's token range
    tokens = loader.read_samples(np.arange(2000))["tokens"][:, 0].numpy()
    np.testing.assert_array_equal(tokens >= BASE["b"], src[:2000] == 1)


def test_source_occurrences_are_consecutive_per_block(data):
    loader = make_loader(data[0])
    src, occ = loader.sample_sources(np.arange(MIX_BLOCK, MIX_BLOCK + 1000))
    for s, count in enumerate(loader.block_counts):
        o = occ[src == s]
        assert o.min() >= count and o.max() < 2 * count and len(set(o.tolist())) == len(o)


def test_state_round_trip_gives_identical_next_batches(data):
    loader = make_loader(data[0])
    for _ in range(3 * loader.grad_accum_steps):
        loader.next_batch()
    state = loader.state_dict()
    assert state["next_sample"] == 3 * 8
    expected = [loader.next_batch() for _ in range(8)]
    resumed = make_loader(data[0])
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for want in expected:
        got = resumed.next_batch()
        assert torch.equal(got["tokens"], want["tokens"]) and torch.equal(got["doc_ids"], want["doc_ids"])


def test_partly_consumed_step_resumes_at_the_next_step(data):
    loader = make_loader(data[0])
    loader.next_batch()
    assert loader.state_dict()["next_sample"] == 8


@pytest.mark.parametrize("world_size", [2, 4])
def test_world_sizes_see_the_same_global_batches(data, world_size):
    single, _ = global_steps(data[0], 1, 5)
    multi, _ = global_steps(data[0], world_size, 5)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_resume_on_other_world_sizes_continues_same_samples(data):
    reference, _ = global_steps(data[0], 1, 6)
    first, state = global_steps(data[0], 2, 2)
    second, state = global_steps(data[0], 4, 2, state=state)
    third, _ = global_steps(data[0], 1, 2, state=state)
    for a, b in zip(reference, first + second + third):
        assert torch.equal(a, b)


def test_resume_warns_when_the_mixture_changed(data):
    state = make_loader(data[0]).state_dict()
    other = TrainLoader(
        data[0], [SOURCES[0]], seq_len=T, micro_batch_size=2, global_batch_size=8, vocab_size=VOCAB
    )
    with pytest.warns(UserWarning, match="data mixture changed"):
        other.load_state_dict(state)


def test_global_batch_must_divide_into_ranks():
    """Checked once, by the batch layout every entry point (launcher pre-flight, trainer) computes."""
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 3, 8
    with pytest.raises(UserError, match="train.global_batch_size=8 is not a multiple"):
        batch_layout(cfg, 1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.seq_len=0"], r"train\.seq_len: must be positive, got 0"),
        (["train.micro_batch_size=0"], r"train\.micro_batch_size: must be positive, got 0"),
        (["train.global_batch_size=0"], r"train\.global_batch_size: must be positive, got 0"),
    ],
)
def test_non_positive_sizes_name_their_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(overrides)


def test_val_loader_walks_each_source_once_in_order(data):
    val = ValLoader(data[0], SOURCES, seq_len=T, micro_batch_size=2, vocab_size=VOCAB, tokenizer_hash=HASH)
    assert val.source_names == ["a", "b"]
    windows = (300 - 1) // T  # 18 windows -> 9 batches of 2
    batches = list(val.batches("a"))
    assert len(batches) == val.num_batches("a") == windows // 2
    tokens = torch.cat([b["tokens"] for b in batches]).numpy()
    np.testing.assert_array_equal(tokens[:, 0], np.arange(windows) * T)
    np.testing.assert_array_equal(tokens, tokens[:, :1] + np.arange(T + 1))
    assert [b["tokens"].tolist() for b in val.batches("a")] == [b["tokens"].tolist() for b in batches]
    assert list(val.batches("b")) == []  # 10 tokens: not one window
    assert val.bytes_per_token("a") == pytest.approx(3.0)


def test_val_loader_ranks_split_windows_evenly(data):
    def walk(rank, world_size, **kw):
        val = ValLoader(
            data[0], SOURCES, seq_len=T, micro_batch_size=2, rank=rank, world_size=world_size, **kw
        )
        return [b["tokens"][:, 0].tolist() for b in val.batches("a")]

    ranks = [walk(r, 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 18 // 4
    seen = sorted(x for r in ranks for b in r for x in b)
    assert seen == (np.arange(16) * T).tolist()  # 2 windows of tail left out so ranks stay in step
    assert walk(0, 1, max_batches=3) == walk(0, 1)[:3]


def test_source_shorter_than_a_window_is_an_error_naming_it(tmp_path):
    write_split(tmp_path, "a", "train", 10, 100)
    with pytest.raises(
        DataError, match=r"source 'a': 10 train tokens, fewer than one window of seq_len \+ 1 = 17"
    ):
        TrainLoader(tmp_path, SOURCES[:1], seq_len=T, micro_batch_size=1, global_batch_size=1)


def test_source_without_shards_says_to_prepare(tmp_path):
    with pytest.raises(DataError, match=r"shards/a: no shards for source 'a'; run `llmtrain prepare` first"):
        TrainLoader(tmp_path, SOURCES[:1], seq_len=T, micro_batch_size=1, global_batch_size=1)


def make_config(data_dir) -> Config:
    cfg = Config()
    cfg.data.dir = str(data_dir)
    cfg.data.sources = list(SOURCES)
    cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size = T, 2, 8
    cfg.train.val_batches = 2
    return cfg


def test_build_loaders_from_config(data):
    cfg = make_config(data[0])
    train = build_train_loader(cfg, rank=1, world_size=2)
    assert (train.rank, train.world_size, train.grad_accum_steps) == (1, 2, 2)
    assert torch.equal(train.next_batch()["tokens"], make_loader(data[0]).read_samples([4, 5])["tokens"])
    val = build_val_loader(cfg, rank=0, world_size=1)
    assert len(list(val.batches("a"))) == 2


def test_build_without_prepared_data_says_to_prepare(tmp_path):
    cfg = make_config(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"nowhere: data folder not found; run `llmtrain prepare` first"):
        build_train_loader(cfg, 0, 1)
    (tmp_path / "nowhere").mkdir()
    with pytest.raises(
        DataError, match=r"tokenizer\.json: tokenizer sidecar not found; run `llmtrain prepare`"
    ):
        build_val_loader(cfg, 0, 1)


def test_build_rejects_shards_of_another_tokenizer(data, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps({"vocab_size": VOCAB, "hash": "0" * 64}))
    (other / "shards").symlink_to(data[0] / "shards")
    with pytest.raises(DataError, match=r"train_00000\.idx: shard was written by tokenizer ffff"):
        build_train_loader(make_config(other), 0, 1)


# -- read ahead on a thread (llmtrain.data.prefetch) ----------------------------------------------


def prefetched(data_dir, depth=3, **kw):
    from llmtrain.data.prefetch import Prefetcher

    return Prefetcher(make_loader(data_dir, **kw), depth=depth)


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prefetch_hands_out_the_loaders_batches_and_state(data):
    """Rank 1 of 2 with accumulation 2: the same batches, and a state that counts only what was taken."""
    kw = dict(rank=1, world_size=2, micro_batch_size=2, global_batch_size=8)
    plain, ahead = make_loader(data[0], **kw), prefetched(data[0], **kw)
    for i in range(13):
        assert same(ahead.next_batch(), plain.next_batch()), i
        assert ahead.state_dict() == plain.state_dict()
    assert ahead.grad_accum_steps == 2 and ahead.next_sample == plain.next_sample
    ahead.close()


def test_prefetch_restarts_where_a_rollback_puts_the_loader(data):
    ahead = prefetched(data[0])
    for _ in range(5):
        ahead.next_batch()  # the thread has read beyond these
    state = ahead.state_dict()
    state["next_sample"] += 3 * 8  # a rollback that skips three steps
    ahead.load_state_dict(state)
    fresh = make_loader(data[0])
    fresh.load_state_dict(state)
    for _ in range(6):
        assert same(ahead.next_batch(), fresh.next_batch())
    ahead.close()


def test_a_read_error_surfaces_at_the_batch_that_failed_and_stops_the_thread(data, monkeypatch):
    import threading

    ahead = prefetched(data[0])
    real, calls = ahead.loader.read_samples, []

    def read(ks):
        calls.append(int(ks[0]))
        if len(calls) == 3:
            raise DataError("shard x: token id 99 >= vocab size 10")
        return real(ks)

    monkeypatch.setattr(ahead.loader, "read_samples", read)
    ahead.next_batch()
    ahead.next_batch()
    with pytest.raises(DataError, match="token id 99"):
        ahead.next_batch()
    assert not [t for t in threading.enumerate() if t.name == "llmtrain-prefetch"]


def test_close_stops_a_thread_waiting_for_room(data):
    import threading

    ahead = prefetched(data[0], depth=1)
    ahead.next_batch()
    ahead.close()
    assert not [t for t in threading.enumerate() if t.name == "llmtrain-prefetch"]
    assert ahead.state_dict()["next_sample"] == 8  # one micro-batch of a step: the step counts as taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_prefetch_pins_batches_for_the_gpu(data):
    from llmtrain.data.prefetch import Prefetcher

    ahead = Prefetcher(make_loader(data[0]), depth=2, pin_memory=True)
    assert all(t.is_pinned() for t in ahead.next_batch().values())
    ahead.close()
