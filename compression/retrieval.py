"""Retrieval at query time: the bank entries a question is about, as memory tokens to put after the pool.

For a question, the key index (compression.keys) ranks the bank's entries; the best `top_k` that fit the
token budget are read from the bank and laid out oldest first, so the newest sits next to the question.
The model takes them as `retrieved_memory` ([bos, pool, retrieved, question]: where a fresh injection's
tokens sit, which is what the model learned to read; see docs/bank.md for the layouts measured).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compression.bank import BankLayout, MemoryBank, NewEntry
from compression.keys import KeyIndex, make_index
from compression.settings import RetrievalSettings, SlotFormat
from compression.slots import dtype_name


@dataclass(frozen=True)
class Retrieved:
    """What a question brought back: entry seqs and doc_ids (oldest first) and their tokens [L, r, d] (r: the
    entries' slots together; a short tiling entry brings fewer than S)."""

    seqs: list[int]
    doc_ids: list[str]
    tokens: torch.Tensor | None


class Retriever:
    """Keys over a bank's entries, kept in step with it (`add` after appends, `truncate` after a rollback)."""

    def __init__(self, bank: MemoryBank, settings: RetrievalSettings, index: KeyIndex | None = None):
        self.bank, self.settings = bank, settings
        self.index = index or make_index(settings.keys)
        seqs, texts = bank.texts()
        if seqs:
            self.index.add(seqs, texts)

    @property
    def entries_per_query(self) -> int:
        """top_k, capped by the token budget (each entry brings at most S slots per layer)."""
        return max(1, min(self.settings.top_k, self.settings.token_budget // self.bank.layout.slots))

    def add(self, seqs: Sequence[int], texts: Sequence[str]) -> None:
        self.index.add(seqs, texts)

    def truncate(self, last_seq: int) -> None:
        self.index.truncate(last_seq)

    def retrieve(self, question: str) -> Retrieved:
        """The entries for `question` (none when the bank is empty)."""
        hits = self.index.search([question], self.entries_per_query)[0]
        seqs = sorted(seq for seq, _ in hits)
        if not seqs:
            return Retrieved([], [], None)
        doc_ids = {info["seq"]: info["doc_id"] for info in self.bank.infos(seqs)}
        tokens = torch.cat(self.bank.slots(seqs), dim=1)  # [L, r, d], oldest entry first; lengths may differ
        return Retrieved(seqs, [doc_ids[seq] for seq in seqs], tokens)


class StreamBank:
    """A real bank at `uri` fed straight from a model's injections, with its retriever: what evaluations
    and benchmarks use to measure retrieval without a server. Entries carry no drops (not replayable)."""

    def __init__(self, model, uri: str, settings: RetrievalSettings, slot_format: SlotFormat | None = None):
        config = model.config
        layout = BankLayout(config.num_hidden_layers, config.num_tokens, config.hidden_size,
                            dtype_name(model.memory.dtype), config.drop_memory_per_layer,
                            slot_format or SlotFormat())
        self.bank = MemoryBank(uri, layout)
        self.retriever = Retriever(self.bank, settings)

    def add(self, doc_id: str, text: str, tokens: torch.Tensor) -> None:
        """Append one injected context's new tokens [L, k, d] (k = K, or fewer into an empty pool) as an
        entry."""
        entry = NewEntry(doc_id, 0, text, tokens.detach(), None)
        seqs = self.bank.append([entry], version=self.bank.next_seq + 1)
        self.retriever.add(seqs, [text])

    def retrieve(self, questions: Sequence[str]) -> list[torch.Tensor | None]:
        """Per question, the retrieved tokens [L, r, d] (None with an empty bank)."""
        return [self.retriever.retrieve(question).tokens for question in questions]
