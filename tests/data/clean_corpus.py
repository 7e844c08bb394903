"""A small English corpus with planted problems for the clean stage tests (deterministic).

`write_planted(folder)` writes:
    web.jsonl   good prose documents, then: exact copies of two of them (one with doubled spaces: equal
                after normalization), near copies of two (three words changed), a spam page, a navigation
                boilerplate page, a page of short list lines, a too-short note, a one-liner, and two
                pages that quote an evaluation task
    books/      good prose, one file per document, plus an exact and a near copy of two of them
    tasks/      two task files (JSONL) that the contaminated pages quote
and returns a `Planted` with the expected kept texts and removal counts per source.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ADJECTIVES = [
    "old",
    "young",
    "quiet",
    "tired",
    "curious",
    "lonely",
    "small",
    "tall",
    "cheerful",
    "patient",
    "careful",
    "clever",
    "gentle",
    "brave",
    "busy",
    "humble",
    "proud",
    "shy",
    "wise",
    "honest",
    "nervous",
    "calm",
]
PEOPLE = [
    "man",
    "woman",
    "farmer",
    "teacher",
    "captain",
    "baker",
    "traveler",
    "doctor",
    "gardener",
    "student",
    "mayor",
    "neighbor",
    "painter",
    "sailor",
    "writer",
    "miner",
    "weaver",
    "soldier",
    "merchant",
    "nurse",
]
THINGS = [
    "market",
    "road",
    "house",
    "river",
    "fence",
    "basket",
    "square",
    "bridge",
    "box",
    "library",
    "train",
    "field",
    "street",
    "letter",
    "harbor",
    "boots",
    "garden",
    "table",
    "window",
    "lantern",
    "orchard",
    "mill",
]
VERBS = [
    "walked to",
    "looked at",
    "thought about",
    "waited near",
    "carried",
    "found",
    "remembered",
    "painted",
    "followed",
    "cleaned",
    "visited",
    "described",
    "repaired",
    "watched",
    "opened",
    "counted",
    "measured",
    "admired",
    "passed",
    "sold",
    "bought",
    "guarded",
    "crossed",
    "studied",
]
PREPOSITIONS = ["before", "after", "during", "on", "through", "since", "until", "despite"]
TIMES = ["morning", "evening", "night", "winter", "storm", "summer", "holiday", "harvest", "festival", "week"]


SPAM = "Buy the best watches and phones now! Click here to win a free phone with every order!\n" * 30
BOILERPLATE = "\n".join(
    [
        "Home | About us | Contact | Login",
        "Products and services for the whole family",
        "Latest news from the blog",
        "Shop by category",
        "Men Women Kids Sale New arrivals",
        "Customer service and help center",
        "Track your order",
        "Returns and exchanges",
        "Gift cards and vouchers",
        "Follow us on social media",
        "Sign up for our newsletter to get the latest deals",
        "Copyright 2024 Example Shop Incorporated All rights reserved",
        "Back to the top of the page",
    ]
)
ITEMS = ["Milk", "Bread", "Cheese", "Soup", "Tea", "Rice", "Fish", "Cake", "Jam", "Eggs", "Salt", "Plums"]
SIDES = ["honey", "butter", "pepper", "lemon", "herbs", "cream", "onions", "garlic", "beans", "nuts", "figs"]


def list_page(rng: random.Random) -> str:
    """Short lines that each end in a full stop: C4 keeps them, FineWeb's short-line rule does not."""
    forms = (
        "{} with a bit of {}.",
        "{} and some fresh {}.",
        "{} is good with {}.",
        "{} for the whole day.",
        "{} to go with {}.",
        "{} or maybe {}.",
        "{} served with {}.",
        "{} that has {} in it.",
    )
    lines = []
    for item in ITEMS:
        for form in rng.sample(forms, 2):
            lines.append(form.format(item, rng.choice(SIDES)))
    return "\n".join(lines)


SHORT_NOTE = (
    "The meeting moved to the small room on the second floor. Bring the papers and a pen with you, and "
    "come early."
)
ONE_LINER = "Thanks for reading."
TASKS = {
    "qa_mini": [
        {
            "question": "Which planet in our solar system has the largest number of known moons orbiting it today?",
            "answer": "Saturn has the largest number of known moons",
        },
        {
            "question": "What gas do green plants take in from the air to make their food through photosynthesis?",
            "answer": "carbon dioxide",
        },
    ],
    "cloze_mini": [
        {
            "context": "The committee agreed that the annual harvest festival would be held beside the northern lake",
            "choices": ["this year", "next spring"],
            "label": 0,
        },
    ],
}


def sentence(rng: random.Random) -> str:
    subject = f"{rng.choice(('the', 'a', 'our', 'my'))} {rng.choice(ADJECTIVES)} {rng.choice(PEOPLE)}"
    thing = f"{rng.choice(('the', 'a', 'that', 'her', 'his'))} {rng.choice(ADJECTIVES)} {rng.choice(THINGS)}"
    when = f"{rng.choice(PREPOSITIONS)} {rng.choice(('the', 'a', 'one'))} {rng.choice(ADJECTIVES)} {rng.choice(TIMES)}"
    text = f"{subject} {rng.choice(VERBS)} {thing} {when}."
    return text[0].upper() + text[1:]


def prose(rng: random.Random, paragraphs: int = 5) -> str:
    return "\n\n".join(" ".join(sentence(rng) for _ in range(5)) for _ in range(paragraphs))


def near_copy(text: str, rng: random.Random, changes: int = 3) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changes):
        words[i] = "purple" if words[i] != "purple" else "orange"
    return " ".join(words)


@dataclass
class Planted:
    web: Path
    books: Path
    tasks: Path
    kept: dict[str, list[str]] = field(default_factory=dict)
    """Source -> the texts that must survive, in corpus order."""
    removed: dict[str, dict[str, int]] = field(default_factory=dict)
    docs_in: dict[str, int] = field(default_factory=dict)


def write_planted(folder: Path, *, good: int = 24, books: int = 7, seed: int = 0) -> Planted:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    for name, records in TASKS.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tasks / "README.yaml").write_text("not a task file: skipped\n")

    docs = [prose(rng) for _ in range(good)]
    quote_qa = f"{prose(rng, 2)}\n\nAs the quiz asked: {TASKS['qa_mini'][0]['question']} {prose(rng, 1)}"
    quote_cloze = f"{prose(rng, 2)} {TASKS['cloze_mini'][0]['context']} this year. {prose(rng, 1)}"
    web = docs + [
        docs[3],
        docs[7].replace(". ", ".  ") + " ",
        near_copy(docs[5], rng),
        near_copy(docs[11], rng),
        SPAM,
        BOILERPLATE,
        list_page(random.Random(0)),
        SHORT_NOTE,
        ONE_LINER,
        quote_qa,
        quote_cloze,
    ]
    web_path = folder / "web.jsonl"
    web_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in web))

    book_docs = [prose(rng, 6) for _ in range(books)]
    books_dir = folder / "books"
    books_dir.mkdir(exist_ok=True)
    files = book_docs + [book_docs[1], near_copy(book_docs[4], rng)]
    for i, text in enumerate(files):
        (books_dir / f"book_{i:02d}.txt").write_text(text)
    return Planted(
        web=web_path,
        books=books_dir,
        tasks=tasks,
        kept={"web": docs, "books": book_docs},
        removed={
            "web": {
                "length": 1,
                "gopher_repetition": 1,
                "gopher_quality": 1,
                "c4": 1,
                "fineweb": 1,
                "decontaminate:tasks/qa_mini": 1,
                "decontaminate:tasks/cloze_mini": 1,
                "exact_dedup": 2,
                "near_dedup": 2,
            },
            "books": {"exact_dedup": 1, "near_dedup": 1},
        },
        docs_in={"web": len(web), "books": len(files)},
    )


def planted_overrides(
    planted: Planted, data_dir: Path, *, workers: int = 1, web_clean: str = ""
) -> list[str]:
    """Hydra overrides: both sources, every stage on for the mixture (min_chars, four filters in a
    fixed order, decontamination against tasks/, exact + near dedup); books cut into 3 tasks;
    `web_clean` (e.g. "min_chars:900") overrides keys for web alone."""
    web_extra = f",clean:{{{web_clean}}}" if web_clean else ""
    sources = (
        f"[{{name:web,path:'{planted.web}',format:jsonl,weight:1.0{web_extra}}},"
        f"{{name:books,path:'{planted.books}',format:txt,weight:3.0,clean:{{tasks:3}}}}]"
    )
    return [
        f"data.dir={data_dir}",
        f"data.sources={sources}",
        "data.val_fraction=0.1",
        "data.clean.dedup=both",
        "data.clean.filters=[gopher_quality,gopher_repetition,c4,fineweb]",
        "data.clean.min_chars=100",
        f"data.clean.decontaminate=['{planted.tasks}']",
        "tokenizer.vocab_size=400",
        "prepare.shard_tokens=4000",
        f"prepare.workers={workers}",
        "prepare.progress=false",
        "train.max_steps=100",
        "train.global_batch_size=8",
        "train.seq_len=128",
    ]
