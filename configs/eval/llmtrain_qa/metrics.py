"""SQuAD-style exact match and token F1 for llmtrain_qa (local: lm-eval's HF `evaluate` metrics
would download). `!function metrics.process_results` in the task YAML points here."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def f1(prediction: str, answer: str) -> float:
    """Harmonic mean of token precision and recall over the normalized words."""
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Best score over the accepted answers, per metric."""
    prediction = results[0]
    return {
        "exact_match": max(exact_match(prediction, a) for a in doc["answers"]),
        "f1": max(f1(prediction, a) for a in doc["answers"]),
    }
