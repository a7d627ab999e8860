"""Retrieval keys (compression.keys): each kind finds the entry asked about; truncate, appends, ids."""

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from compression.keys import BM25Index, DenseIndex, HybridIndex, make_index
from documents.parse import parse_document
from synthetic import bios

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FOREIGN_DOCS = Path(__file__).parent / "data" / "foreign_docs.jsonl"
PEOPLE = list(bios.bio_documents(60, "heldout", seed=7))
# bm25 part placements: all in the tail, rebuilt at almost every add, and a mix of main part and tail
BM25_OPTIONS = {"tail": {}, "main": {"min_tail": 0}, "mixed": {"min_tail": 8, "tail_fraction": 0.5}}


def hashed_words(texts, dim=256):
    """A fake, model-free encoder: unit-norm bag of hashed lower-cased words."""
    vectors = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().replace("?", " ").replace(".", " ").split():
            vectors[row, zlib.crc32(word.encode()) % dim] += 1.0
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-9)


def fake_index(kind, **options):
    """Every kind, with the hashing encoder standing in for MiniLM where there is a dense part."""
    if kind == "dense":
        return DenseIndex(hashed_words, dim=256, **options)
    if kind == "hybrid":
        return HybridIndex(BM25Index(), DenseIndex(hashed_words, dim=256))
    return BM25Index(**options)


def top_ids(hits):
    return [entry_id for entry_id, _ in hits]


@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_each_kind_finds_the_person_asked_about(kind):
    lines = FOREIGN_DOCS.read_text().splitlines()
    docs = PEOPLE[:36] + [parse_document(line.encode()) for line in lines if line.strip()]
    ids = [1000 + 7 * i for i in range(len(docs))]  # ids, not positions
    index = make_index(kind)
    index.add(ids, [doc.text for doc in docs])
    assert len(index) == len(docs) and index.name == kind
    asked = [(i, probe.question) for i, doc in zip(ids, docs, strict=True) for probe in doc.probes]
    if kind != "bm25":  # keep the MiniLM work small: one question per biography, all foreign ones
        asked = [(entry_id, q) for n, (entry_id, q) in enumerate(asked) if n % 5 == 1 or entry_id >= ids[36]]
    hits = index.search([q for _, q in asked], 4)
    missed = [q for h, (entry_id, q) in zip(hits, asked, strict=True) if top_ids(h)[0] != entry_id]
    assert len(missed) <= (0 if kind != "dense" else len(asked) // 10), missed
    assert all(entry_id in top_ids(h) for h, (entry_id, _) in zip(hits, asked, strict=True))
    assert all(len(h) <= 4 and [s for _, s in h] == sorted((s for _, s in h), reverse=True) for h in hits)


@pytest.mark.parametrize("kind", ["bm25-tail", "bm25-main", "bm25-mixed", "dense", "dense-ivf", "hybrid"])
def test_truncate_forgets_later_entries_and_appends_after_it_work(kind):
    if kind.startswith("bm25"):
        index = fake_index("bm25", **BM25_OPTIONS[kind.split("-")[1]])
    else:
        index = fake_index(kind.split("-")[0], **({"ann": "ivf", "nlist": 1} if kind == "dense-ivf" else {}))
    first, removed, later = PEOPLE[:20], PEOPLE[20:40], PEOPLE[40:50]
    for start in range(0, 40, 8):  # several appends, so that some land in each part
        index.add(range(start, start + 8), [doc.text for doc in (first + removed)[start : start + 8]])
    if kind == "dense-ivf":
        assert index.is_ivf
    index.truncate(19)
    assert len(index) == 20
    about_removed = [doc.probes[0].question for doc in removed]
    assert all(max(top_ids(h), default=-1) <= 19 for h in index.search(about_removed, 10))

    index.add(range(20, 30), [doc.text for doc in later])  # ids 20..29 again, other people
    assert len(index) == 30
    hits = index.search(about_removed + [doc.probes[2].question for doc in later + first], 10)
    assert all(max(top_ids(h), default=-1) <= 29 for h in hits)
    assert [top_ids(h)[0] for h in hits[20:]] == [*range(20, 30), *range(20)]

    index.truncate(-1)
    assert len(index) == 0 and index.search(about_removed[:2], 3) == [[], []]
    index.add([5], [later[0].text])
    assert top_ids(index.search([later[0].probes[0].question], 3)[0]) == [5]


@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_empty_index_and_k_larger_than_the_index(kind):
    index = fake_index(kind)
    assert index.search(["Who is anyone?", "What?"], 4) == [[], []]
    assert index.search([], 4) == []
    index.add([3, 8, 9], [doc.text for doc in PEOPLE[:3]])
    hits = index.search([PEOPLE[1].probes[0].question], 50)[0]
    assert top_ids(hits)[0] == 8 and len(hits) <= 3 and set(top_ids(hits)) <= {3, 8, 9}
    if kind == "dense":
        assert len(hits) == 3  # every entry has a cosine similarity
    assert index.search([PEOPLE[1].probes[0].question], 0) == [[]]


def test_many_small_appends_give_the_results_of_one_big_add():
    docs = PEOPLE * 5  # 300 entries; the same people repeat, so many scores tie
    texts = [doc.text for doc in docs]
    questions = [probe.question for doc in PEOPLE for probe in doc.probes]
    one_add = BM25Index()
    one_add.add(range(len(texts)), texts)
    small = BM25Index()
    for start in range(0, len(texts), 32):
        small.add(range(start, min(start + 32, len(texts))), texts[start : start + 32])
    assert small.rebuilds >= 1 and len(small) == len(one_add)
    expected = one_add.search(questions, 5)
    got = small.search(questions, 5)
    # the same person's entry on top, with about the same score (the main part and the tail share the
    # mean entry length of the last rebuild, the one big add that of all entries)
    assert [[entry_id % 60 for entry_id in top_ids(h)] for h in got] == [[i // 5] * 5 for i in range(300)]
    assert [top_ids(h)[0] for h in expected] == [240 + i // 5 for i in range(300)]  # ties: newest first
    assert np.allclose([h[0][1] for h in got], [h[0][1] for h in expected], rtol=0.01)
    small.rebuild()
    assert small.search(questions, 5) == expected


def test_tail_scores_are_bm25s_scores():
    texts = [doc.text for doc in PEOPLE]
    questions = [probe.question for doc in PEOPLE for probe in doc.probes]
    tail_only = BM25Index(min_tail=10**9)
    tail_only.add(range(len(texts)), texts)
    assert tail_only.rebuilds == 0
    from_bm25s = tail_only.search(questions, 5)
    tail_only.rebuild()
    assert tail_only.rebuilds == 1
    rebuilt = tail_only.search(questions, 5)
    assert [top_ids(h) for h in rebuilt] == [top_ids(h) for h in from_bm25s]
    assert np.allclose([s for h in rebuilt for _, s in h], [s for h in from_bm25s for _, s in h], rtol=1e-5)


def test_bad_input_is_refused():
    index = BM25Index()
    index.add([4, 6], ["one text", "another text"])
    with pytest.raises(ValueError, match="ascend"):
        index.add([6], ["again"])
    with pytest.raises(ValueError, match="ascend"):
        index.add([9, 8], ["a", "b"])
    with pytest.raises(ValueError, match="entry ids for"):
        index.add([10], ["a", "b"])
    with pytest.raises(ValueError, match="unknown key index kind"):
        make_index("tfidf")
    assert len(index) == 2
