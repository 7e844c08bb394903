"""Throughput of the clean stage of `llmtrain prepare`, its scaling with workers, and its cost next to
tokenization.

    python bench/bench_clean.py [--mb 16] [--workers 1 2] [--files 8] [--out clean.json]

Corpus: English prose, about `--mb` MB in `--files` JSONL files (the unit datatrove parallelizes
over): the chapters of the Rust book shipped with rustup (HTML turned to text, code blocks dropped),
repeated to size, with 10% of the documents exact copies and 10% near copies (a few words changed) so
the dedup stages have work; without rustup's docs, generated sentences instead.

Rows: each configuration of the clean stage, per worker count: documents/s and MB/s of input, per
worker (wall rate / workers) and in all, from the clean stage alone (`clean_source`, a fresh folder
each time). Last rows: tokenization of the cleaned documents into shards (the rest of `prepare`,
tokenizer fixed) per worker count, and the clean stage's time as a multiple of it.
"""

from __future__ import annotations

import argparse
import contextlib
import html.parser
import io
import json
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from llmtrain.config import load_config

RUST_BOOK = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html/book"
CONFIGS = {
    "filters (4) + length": [
        "data.clean.filters=[gopher_quality,gopher_repetition,c4,fineweb]",
        "data.clean.min_chars=200",
    ],
    "exact dedup": ["data.clean.dedup=exact"],
    "near dedup (MinHash 14x8)": ["data.clean.dedup=near"],
    "all stages": [
        "data.clean.filters=[gopher_quality,gopher_repetition,c4,fineweb]",
        "data.clean.min_chars=200",
        "data.clean.dedup=both",
        "data.clean.decontaminate=[{tasks}]",
    ],
}


class _Text(html.parser.HTMLParser):
    """The prose of an mdBook page: paragraphs and list items, no code, no navigation."""

    def __init__(self):
        super().__init__()
        self.parts, self.depth, self.skip = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style", "nav"):
            self.skip += 1
        elif tag in ("p", "li", "h1", "h2", "h3"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style", "nav") and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def rust_book_docs() -> list[str]:
    docs = []
    for page in sorted(RUST_BOOK.glob("ch*.html")):
        parser = _Text()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        text = re.sub(r"[ \t]*\n\s*\n\s*", "\n\n", re.sub(r"[ \t]+", " ", "".join(parser.parts))).strip()
        if len(text) > 2000:
            docs.append(text)
    return docs


def generated_docs(rng: random.Random, n: int = 200) -> list[str]:
    people = [
        "farmer",
        "teacher",
        "captain",
        "baker",
        "traveler",
        "doctor",
        "gardener",
        "student",
        "sailor",
        "writer",
    ]
    things = [
        "market",
        "road",
        "house",
        "river",
        "fence",
        "basket",
        "square",
        "bridge",
        "library",
        "garden",
        "window",
        "mill",
    ]
    verbs = [
        "walked to",
        "looked at",
        "thought about",
        "waited near",
        "carried",
        "found",
        "repaired",
        "watched",
        "crossed",
    ]
    adjs = [
        "old",
        "young",
        "quiet",
        "tired",
        "curious",
        "lonely",
        "small",
        "tall",
        "careful",
        "clever",
        "gentle",
        "brave",
        "busy",
    ]

    def sentence():
        s = f"the {rng.choice(adjs)} {rng.choice(people)} {rng.choice(verbs)} the {rng.choice(adjs)} {rng.choice(things)}"
        return s[0].upper() + s[1:] + f" before the {rng.choice(adjs)} evening."

    return ["\n\n".join(" ".join(sentence() for _ in range(6)) for _ in range(8)) for _ in range(n)]


def write_corpus(folder: Path, mb: float, files: int, seed: int = 0) -> tuple[int, int]:
    """JSONL files of about `mb` MB; returns (documents, characters)."""
    rng = random.Random(seed)
    base = rust_book_docs() if RUST_BOOK.is_dir() else []
    source = "rust book" if base else "generated"
    base = base or generated_docs(rng)
    docs, chars, copy = [], 0, 0
    while chars < mb * 1e6:
        text = base[len(docs) % len(base)]
        if len(docs) >= len(base):  # later rounds: vary the words so they are new documents
            copy += 1
            text = re.sub(r"\bthe\b", f"the{copy % 97}", text) if copy % 5 else text
        roll = rng.random()
        if docs and roll < 0.1:
            text = docs[rng.randrange(len(docs))]
        elif docs and roll < 0.2:
            words = docs[rng.randrange(len(docs))].split(" ")
            for i in rng.sample(range(len(words)), min(3, len(words))):
                words[i] = "zebra"
            text = " ".join(words)
        docs.append(text)
        chars += len(text)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(folder / f"part_{f:03d}.jsonl", "w") as out:
            for text in docs[f * len(docs) // files : (f + 1) * len(docs) // files]:
                out.write(json.dumps({"text": text}) + "\n")
    print(
        f"corpus: {len(docs):,} documents, {chars / 1e6:.1f} M characters ({source}), {files} files",
        flush=True,
    )
    return len(docs), chars


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.0)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import llmtrain.data.clean_pipeline  # noqa: F401  (datatrove's import is not part of any row)
    from llmtrain.data.clean import clean_source
    from llmtrain.data.prepare import prepare

    tmp = Path(tempfile.mkdtemp(prefix="bench_clean_"))
    rows = []
    try:
        docs, chars = write_corpus(tmp / "corpus", args.mb, args.files)
        tasks = tmp / "tasks.jsonl"
        tasks.write_text(
            json.dumps({"question": "What does the borrow checker of the compiler verify about references?"})
            + "\n"
        )
        source = f"data.sources=[{{name:prose,path:'{tmp / 'corpus'}',format:jsonl}}]"
        base = [
            source,
            "prepare.progress=false",
            "tokenizer.vocab_size=8192",
            f"data.clean.tasks={args.files}",
        ]
        clean_seconds = {}
        for name in args.configs:
            for workers in args.workers:
                data_dir = tmp / f"data_{len(rows)}"
                extra = [o.format(tasks=tasks) for o in CONFIGS[name]]
                cfg = load_config(base + extra + [f"data.dir={data_dir}", f"prepare.workers={workers}"])
                t0 = time.perf_counter()
                res = clean_source(cfg, 0, workers)
                seconds = time.perf_counter() - t0
                clean_seconds[(name, workers)] = seconds
                rows.append(_row(name, workers, seconds, docs, chars, kept=res.docs_out))
                shutil.rmtree(data_dir)
        # tokenization of the same documents (cleaning off), with one tokenizer trained beforehand
        tok_dir = tmp / "tok"
        with contextlib.redirect_stdout(io.StringIO()):
            prepare(
                load_config(
                    base + [f"data.dir={tok_dir}", "prepare.workers=1", "tokenizer.char_budget=5000000"]
                )
            )
        for workers in args.workers:
            data_dir = tmp / f"tokenize_{workers}"
            cfg = load_config(
                base
                + [
                    f"data.dir={data_dir}",
                    f"prepare.workers={workers}",
                    f"tokenizer.path={tok_dir / 'tokenizer.model'}",
                ]
            )
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                prepare(cfg)
            seconds = time.perf_counter() - t0
            row = _row("tokenize (rest of prepare)", workers, seconds, docs, chars)
            for name in args.configs:
                if (name, workers) in clean_seconds:
                    row[f"clean/{name}"] = round(clean_seconds[(name, workers)] / seconds, 2)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _row(name: str, workers: int, seconds: float, docs: int, chars: int, kept: int | None = None) -> dict:
    return {
        "stage": name,
        "workers": workers,
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / seconds, 1),
        "mb_per_s": round(chars / 1e6 / seconds, 3),
        "docs_per_s_per_worker": round(docs / seconds / workers, 1),
        "mb_per_s_per_worker": round(chars / 1e6 / seconds / workers, 3),
        "kept": kept,
    }


def _print(rows: list[dict]) -> None:
    head = f"{'stage':<28} {'workers':>7} {'s':>8} {'docs/s':>9} {'MB/s':>7} {'docs/s/w':>9} {'MB/s/w':>7}  vs tokenize"
    print(head)
    print("-" * len(head))
    for r in rows:
        ratios = ", ".join(f"{k[6:]} {v}x" for k, v in r.items() if k.startswith("clean/"))
        print(
            f"{r['stage']:<28} {r['workers']:>7} {r['seconds']:>8.2f} {r['docs_per_s']:>9.1f} {r['mb_per_s']:>7.2f} "
            f"{r['docs_per_s_per_worker']:>9.1f} {r['mb_per_s_per_worker']:>7.2f}  {ratios}"
        )


if __name__ == "__main__":
    sys.exit(main())
