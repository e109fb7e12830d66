"""Small data sets shipped with sparseflow: 440 English sentences in 44 topics (sentences.txt),
split 220 / 220 into evaluation and calibration halves (the first / last five of each topic)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

SENTENCES = Path(__file__).with_name("sentences.txt")
SPLITS = ("all", "eval", "calibration")


@lru_cache(maxsize=1)
def _parse() -> tuple[tuple[str, str, int], ...]:
    """(sentence, topic, index within topic) for every sentence, in file order."""
    rows, topic, index = [], None, 0
    for raw in SENTENCES.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("## "):
            topic, index = line[3:].strip(), 0
            continue
        if line.startswith("#"):
            continue
        if topic is None:
            raise ValueError(f"{SENTENCES}: sentence before the first '## topic' line: {line!r}")
        rows.append((line, topic, index))
        index += 1
    return tuple(rows)


def load_sentences(split: str = "all", with_topics: bool = False):
    """The shipped sentences: split "all" | "eval" (first half of each topic) | "calibration" (second
    half; disjoint from "eval"). With `with_topics`, a list of (sentence, topic) pairs."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    rows = [r for r in _parse() if split == "all" or (r[2] < 5) == (split == "eval")]
    return [(s, t) for s, t, _ in rows] if with_topics else [s for s, _, _ in rows]


__all__ = ["SENTENCES", "SPLITS", "load_sentences"]
