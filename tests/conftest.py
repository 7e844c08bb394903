"""Shared fixtures.

`prepared_data` (session scope): a tiny two-source corpus, tokenized through the real
`llmtrain.data.prepare.prepare`, in a few seconds:
    books  a folder of 32 .txt files (one document each),    weight 1
    web    one .jsonl file of 240 records (field "text"),     weight 3
Generated text (a fixed pseudo-random "language" of ~400 words), tokenizer: sentencepiece BPE with
vocab 512, 10% of documents held out for validation, shards of ~12k tokens so both sources have
several train shards and at least one val shard. Attributes:
    .data_dir   Path of the prepared folder (tokenizer.model, tokenizer.json, shards/...)
    .overrides  list[str] of Hydra overrides that point a config at it, e.g.
                `load_config(prepared_data.overrides + ["debug=cpu"])`
    .corpus_dir Path of the raw corpus (books/ and web.jsonl)
    .vocab_size 512
    .sources    ["books", "web"]
The folder is shared by the whole session: read it, never write into it (copy it with
`shutil.copytree` first when a test must change it).

`make_config` (function scope): `make_config(*overrides) -> Config`, composing the real config tree
with the given Hydra overrides (a ConfigError says what is wrong).

`write_corpus(folder, *, books=24, records=160, seed=0)` (plain function, also used by the data
tests): writes the corpus above and returns (books_dir, jsonl_path).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

# DeepSpeed's CPU communication op is built once per checkout, here: a build cache shared with other
# checkouts (each path a different build command, so each run rebuilds) or a lock left there by a
# build killed elsewhere must not slow or hang this suite. TORCH_EXTENSIONS_DIR, when set, wins.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
)


def pytest_sessionstart(session):
    """Build DeepSpeed's CPU communication op before the first test, outside every test's timeout.

    Its first build takes one to three minutes on 2 cores; inside a test it would count against that
    test's limit, and a test killed at its limit would leave the build half done.
    """
    import importlib.util
    import subprocess
    import sys

    from llmtrain.distributed.extensions import SHM_COMM_OP, extensions_root

    if (
        importlib.util.find_spec("deepspeed") is None
        or (extensions_root() / SHM_COMM_OP / f"{SHM_COMM_OP}.so").exists()
    ):
        return
    print(f"conftest: building DeepSpeed's {SHM_COMM_OP} op into {extensions_root()} (once per checkout)...")
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=1800, capture_output=True)


VOCAB_SIZE = 512
SHARD_TOKENS = 12_000


def _lexicon(rng: random.Random, size: int = 400) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["th", "sh", "qu", "er", "an", "on"]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))))
    words = sorted(words)
    rng.shuffle(words)  # frequency rank independent of spelling
    return words


def _zipf(n: int) -> list[float]:
    return [1.0 / (rank + 1) for rank in range(n)]


def _paragraph(rng: random.Random, words: list[str], sentences: int) -> str:
    out = []
    weights = _zipf(len(words))
    for _ in range(sentences):
        # Zipf word frequencies, so there are frequent words for the tokenizer and the model to learn
        sent = rng.choices(words, weights, k=rng.randint(4, 12))
        sent[0] = sent[0].capitalize()
        out.append(" ".join(sent) + rng.choice(".....?!"))
    return " ".join(out)


def write_corpus(folder: Path, *, books: int = 32, records: int = 240, seed: int = 0) -> tuple[Path, Path]:
    """A txt folder (one document per file) and a jsonl file of generated text; deterministic."""
    rng = random.Random(seed)
    words = _lexicon(rng)
    books_dir = folder / "books"
    books_dir.mkdir(parents=True, exist_ok=True)
    for i in range(books):
        paras = [_paragraph(rng, words, rng.randint(3, 8)) for _ in range(rng.randint(8, 20))]
        (books_dir / f"book_{i:03d}.txt").write_text(f"Book {i}\n\n" + "\n\n".join(paras) + "\n")
    web = folder / "web.jsonl"
    with open(web, "w") as f:
        for i in range(records):
            f.write(json.dumps({"id": i, "text": _paragraph(rng, words, rng.randint(4, 30))}) + "\n")
    return books_dir, web


def corpus_overrides(data_dir: Path, books_dir: Path, web: Path) -> list[str]:
    """Hydra overrides for the two-source corpus written by `write_corpus`."""
    sources = (
        f"[{{name:books,path:'{books_dir}',format:txt,weight:1.0}},"
        f"{{name:web,path:'{web}',format:jsonl,text_field:text,weight:3.0}}]"
    )
    return [
        f"data.dir={data_dir}",
        f"data.sources={sources}",
        "data.val_fraction=0.1",
        f"tokenizer.vocab_size={VOCAB_SIZE}",
        f"prepare.shard_tokens={SHARD_TOKENS}",
        "prepare.workers=1",
        "prepare.progress=false",
    ]


@dataclass(frozen=True)
class PreparedData:
    data_dir: Path
    overrides: list[str]
    corpus_dir: Path
    vocab_size: int = VOCAB_SIZE
    sources: tuple[str, ...] = ("books", "web")


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> PreparedData:
    from llmtrain.config import load_config
    from llmtrain.data.prepare import prepare

    root = tmp_path_factory.mktemp("prepared")
    books_dir, web = write_corpus(root / "corpus")
    overrides = corpus_overrides(root / "data", books_dir, web)
    prepare(load_config(overrides))
    return PreparedData(data_dir=root / "data", overrides=overrides, corpus_dir=root / "corpus")


@pytest.fixture
def make_config():
    from llmtrain.config import load_config

    def make(*overrides: str):
        return load_config(list(overrides))

    return make
