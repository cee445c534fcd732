"""Real English text for transformer calibration and evaluation: the Wikipedia excerpt that
ships with gensim's test data (no network needed).

    pip install gensim
    python models/wiki_text.py          # prints a summary of the articles and the splits

File: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(1.7 MB, 206 pages). Redirect pages and non-article namespaces (titles with ``:``) are dropped,
which leaves 106 articles (about 480k words); each is cleaned with
``gensim.corpora.wikicorpus.filter_wiki`` and then tidied here (bold/italic quotes removed,
``==Heading==`` lines turned into plain ``Heading`` lines, lines without letters or digits
dropped, the trailing References / External links / Further reading / See also / Notes
sections cut off).

Splits are by whole article, fixed by a seed, and disjoint::

    s = splits()                  # {"calibration": [...], "validation": [...], "evaluation": [...]}
    calibration_articles()        # 40% of the articles (seed 0)
    validation_articles()         # 10%
    evaluation_articles()         # 50%

This module needs only gensim and numpy (no torch); it is not part of the onnxprune package.
Add ``models/`` to ``sys.path`` to import it.
"""

from __future__ import annotations

import bz2
import functools
import os
import re
from collections.abc import Sequence

import numpy as np

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPLIT_SEED = 0
FRACTIONS = (("calibration", 0.4), ("validation", 0.1), ("evaluation", 0.5))

_TAIL_SECTIONS = ("references", "external links", "further reading", "see also", "notes",
                  "footnotes", "bibliography", "sources")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_HAS_WORD = re.compile(r"[A-Za-z0-9]")


def wiki_path() -> str:
    """Path of the bz2 dump inside the installed gensim package."""
    try:
        import gensim
    except ImportError as e:  # pragma: no cover
        raise ImportError("models/wiki_text.py needs gensim: pip install gensim") from e
    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", WIKI_FILE)
    if not os.path.exists(path):  # pragma: no cover
        raise FileNotFoundError(f"gensim test data not found: {path}")
    return path


def clean(markup: str) -> str:
    """Wiki markup -> plain text paragraphs (filter_wiki + a light tidy-up)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(markup)
    text = text.replace("'''", "").replace("''", "")
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        m = _HEADING.match(line)
        if m:
            title = m.group(2).strip()
            if title.lower() in _TAIL_SECTIONS:
                break
            line = title
        line = re.sub(r"[ \t]+", " ", line)
        if not _HAS_WORD.search(line):
            if lines and lines[-1] != "":
                lines.append("")
            continue
        lines.append(line)
    return "\n".join(lines).strip()


@functools.lru_cache(maxsize=1)
def _load() -> tuple[tuple[str, str], ...]:
    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.BZ2File(wiki_path()) as f:
        for title, markup, _pageid in extract_pages(f):
            if ":" in title or markup.lstrip().lower().startswith("#redirect"):
                continue
            text = clean(markup)
            if text:
                out.append((title, text))
    return tuple(out)


def titled_articles() -> list[tuple[str, str]]:
    """[(title, text)] in file order."""
    return list(_load())


def articles() -> list[str]:
    """Cleaned article texts, in file order (106 articles)."""
    return [t for _, t in _load()]


def splits(seed: int = SPLIT_SEED, fractions: Sequence[tuple[str, float]] = FRACTIONS
           ) -> dict[str, list[str]]:
    """Disjoint article splits by a seeded permutation of the article indices."""
    arts = articles()
    n = len(arts)
    order = np.random.default_rng(seed).permutation(n)
    out: dict[str, list[str]] = {}
    start = 0
    for i, (name, frac) in enumerate(fractions):
        stop = n if i == len(fractions) - 1 else start + int(round(frac * n))
        out[name] = [arts[j] for j in sorted(order[start:stop])]
        start = stop
    return out


def split_titles(seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    titles = [t for t, _ in _load()]
    arts = articles()
    index = {a: i for i, a in enumerate(arts)}
    return {k: [titles[index[a]] for a in v] for k, v in splits(seed).items()}


def calibration_articles(seed: int = SPLIT_SEED) -> list[str]:
    return splits(seed)["calibration"]


def validation_articles(seed: int = SPLIT_SEED) -> list[str]:
    return splits(seed)["validation"]


def evaluation_articles(seed: int = SPLIT_SEED) -> list[str]:
    return splits(seed)["evaluation"]


def token_windows(ids: np.ndarray, length: int, count: int | None = None,
                  seed: int | None = None) -> np.ndarray:
    """Cut a 1-D token stream into non-overlapping windows [N, length] (int64).

    With ``count`` and ``seed``, pick ``count`` of them at random (seeded, sorted); with
    ``count`` only, the first ``count``.
    """
    ids = np.asarray(ids, dtype=np.int64).ravel()
    n = len(ids) // length
    win = ids[: n * length].reshape(n, length)
    if count is not None:
        if count > n:
            raise ValueError(f"asked for {count} windows of {length} tokens, the text has {n}")
        if seed is None:
            win = win[:count]
        else:
            win = win[np.sort(np.random.default_rng(seed).choice(n, count, replace=False))]
    return np.ascontiguousarray(win)


if __name__ == "__main__":
    arts = titled_articles()
    words = sum(len(t.split()) for _, t in arts)
    print(f"{len(arts)} articles, {words} words, from {wiki_path()}")
    for name, part in splits().items():
        print(f"  {name}: {len(part)} articles, {sum(len(a.split()) for a in part)} words")
    print("first article:", arts[0][0])
    print(arts[0][1][:600])
