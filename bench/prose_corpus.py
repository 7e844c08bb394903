"""English prose from local HTML documentation, as JSONL (one page per record), for benchmarks that need
prose rather than code (bench/ablate.py): the learning-recipe ablations are measured on it.

Why this source: nothing may be downloaded here, and the Rust toolchain ships several books of edited
English (The Rust Programming Language, the Reference, the Rustonomicon, the Cargo and rustc books, ...)
as mdBook HTML. Only each page's `<main>` text is kept; navigation, scripts and code listings
(`<pre>`) are dropped, and the books' one-page `print.html` copies are skipped.

    python bench/prose_corpus.py --out /tmp/prose.jsonl [--root DIR] [--books book,reference,...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_ROOT = Path.home() / ".rustup/toolchains/stable-x86_64-unknown-linux-gnu/share/doc/rust/html"
BOOKS = (
    "book",
    "reference",
    "nomicon",
    "edition-guide",
    "cargo",
    "rustc",
    "embedded-book",
    "rustdoc",
    "style-guide",
)
SKIPPED_TAGS = {"script", "style", "pre", "nav", "svg", "button"}
BLOCK_TAGS = {"p", "li", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "tr", "dt", "dd", "div", "section"}


class MainText(HTMLParser):
    """Collects the text inside <main>, outside the skipped tags, one paragraph per block element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_main = 0
        self.skipping = 0
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "main":
            self.in_main += 1
        elif self.in_main and tag in SKIPPED_TAGS:
            self.skipping += 1
        elif self.in_main and tag in BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag == "main":
            self.in_main = max(0, self.in_main - 1)
        elif self.in_main and tag in SKIPPED_TAGS:
            self.skipping = max(0, self.skipping - 1)

    def handle_data(self, data):
        if self.in_main and not self.skipping:
            self.parts.append(data)

    def text(self) -> str:
        joined = "".join(self.parts)
        paragraphs = (re.sub(r"\s+", " ", p).strip() for p in joined.split("\n\n"))
        return "\n\n".join(p for p in paragraphs if p)


def page_text(path: Path) -> str:
    parser = MainText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder holding the mdBook folders")
    parser.add_argument("--books", default=",".join(BOOKS))
    parser.add_argument("--min-chars", type=int, default=500, help="drop pages shorter than this")
    args = parser.parse_args(argv)
    books = [b for b in args.books.split(",") if b]
    missing = [b for b in books if not (args.root / b).is_dir()]
    if missing:
        print(
            f"prose_corpus: {args.root}: no book folder(s) {', '.join(missing)} (pass --root/--books)",
            file=sys.stderr,
        )
        return 2
    pages = chars = 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as out:
        for book in books:
            for path in sorted((args.root / book).rglob("*.html")):
                if path.name in ("print.html", "toc.html", "404.html") or "searchindex" in path.name:
                    continue
                text = page_text(path)
                if len(text) < args.min_chars:
                    continue
                record = {"id": f"{book}/{path.relative_to(args.root / book)}", "text": text}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                pages += 1
                chars += len(text)
    print(f"prose_corpus: {pages} pages, {chars / 1e6:.1f}M characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
