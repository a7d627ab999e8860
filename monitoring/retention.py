"""Retention of injected knowledge: exact-match accuracy on a document's probes as later injections pile up.

Protocol. From the model's current pool, first the no-injection baseline: every probe asked with none of
the documents injected (for unseen facts this must sit near chance). Then a stream of documents is
injected one after another; documents with probes are followed by enough others (unprobed ones, such as
other people's biographies) that each can be followed by max(later) injections. After the injection at
stream step s, the probes of the document injected at step s - n are asked, for every n in `later`:
n = 0 is "fresh", right after its own injection. Answers are generated greedily in the Q/A format of
model.prompts and compared with `answers_match`. Next to the measured curve: the survival theory
fresh x (1 - K/N)^n, the expected share of a document's memory tokens still in the pool after n later
injections (K dropped at random out of N per injection). The model's pool is restored afterwards.

With a bank (any object with `add(doc_id, text, tokens)` and `retrieve(questions)`, such as
compression.retrieval.StreamBank), every injection is also appended to it and every probe is asked
twice: from the pool alone and with the entries retrieved for the question after the pool; the result
then has a second curve, "bank_curve", measured on the same injections. Every answer asked after an
injection is in the result too ("answers": the document's stream position, question, truth, what the
model said), for error analysis.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.contexts import split_contexts
from model.prompts import answers_match, extract_answer, format_question

DEFAULT_LATER = (0, 1, 5, 10, 20, 50, 100)


@dataclass(frozen=True)
class ProbedText:
    """A text to inject and the (question, answer) pairs it supports."""

    text: str
    probes: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, document) -> "ProbedText":
        """A document's text and probes (any object with `text` and `probes` of question and answer)."""
        return cls(document.text, tuple((p.question, p.answer) for p in document.probes))


def spaced(stream: Sequence[ProbedText], spacers: Sequence[str], spacing: int) -> list[ProbedText]:
    """The stream with `spacing` unprobed texts, taken in order from `spacers`, after each probed document:
    with spacing >= max(later), no other probed document comes between a document and its questions."""
    needed = spacing * sum(1 for doc in stream if doc.probes)
    if len(spacers) < needed:
        raise ValueError(f"spacing {spacing} needs {needed} spacer texts, got {len(spacers)}")
    spacer_texts, result = iter(spacers), []
    for doc in stream:
        result.append(doc)
        if doc.probes:
            result += [ProbedText(next(spacer_texts), ()) for _ in range(spacing)]
    return result


class Bank(Protocol):
    def add(self, doc_id: str, text: str, tokens: torch.Tensor) -> None: ...

    def retrieve(self, questions: Sequence[str]) -> list[torch.Tensor | None]: ...


class QueryRunner:
    """Tokenises, injects and answers with one model (ids without special tokens, as in training)."""

    def __init__(self, model, tokenizer, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.get_input_embeddings().weight.device
        self.generator = torch.Generator().manual_seed(seed)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def inject(self, text: str) -> list[tuple[str, torch.Tensor]]:
        """Inject a text, split into contexts that fit the model's window; returns each context's text and
        new memory tokens."""
        ids = self.encode(text)
        injected = []
        for chunk in split_contexts(ids, self.model.config.max_context_tokens):
            context = torch.tensor(chunk, device=self.device)
            tokens = self.model.inject_memory(context, generator=self.generator)
            injected.append((text if len(chunk) == len(ids) else self.tokenizer.decode(chunk), tokens))
        return injected

    @torch.no_grad()
    def answer(self, questions: Sequence[str], max_new_tokens: int,
               retrieved: Sequence[torch.Tensor | None] | None = None, context: str = "") -> list[str]:
        """Greedy answers (text up to the first newline) to a batch of questions, each with its retrieved
        memory tokens after the pool when given, and after `context` (text in the prompt) when given."""
        if retrieved is not None:
            shapes = {None if r is None else tuple(r.shape) for r in retrieved}
            if len(shapes) > 1:  # rows must share one shape: ask them one by one
                return [self.answer([question], max_new_tokens, [tokens], context)[0]
                        for question, tokens in zip(questions, retrieved, strict=True)]
            if shapes == {None}:
                retrieved = None
        context_ids = self.encode(context) if context else []
        prompts = [context_ids + self.encode(format_question(q)) for q in questions]
        length = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        extra = {}
        if retrieved is not None:
            extra["retrieved_memory"] = torch.stack(list(retrieved)).to(self.device)  # [B, L, r, d]
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=pad, eos_token_id=None, **extra)
        texts = self.tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
        return [extract_answer(t) for t in texts]

    def answers_to(self, probes: Sequence[tuple[str, str]], max_new_tokens: int,
                   batch_size: int = 64, bank: Bank | None = None) -> list[str]:
        """The model's answers to the probes' questions, in batches (with the bank's entries if given)."""
        answers = []
        for start in range(0, len(probes), batch_size):
            questions = [q for q, _ in probes[start : start + batch_size]]
            answers += self.answer(questions, max_new_tokens, bank.retrieve(questions) if bank else None)
        return answers

    @torch.no_grad()
    def lm_loss(self, texts: Sequence[str]) -> float:
        """Mean next-token cross-entropy over the texts, with the current pool in front."""
        total, count = 0.0, 0
        for text in texts:
            ids = torch.tensor([self.encode(text)], device=self.device)
            logits = self.model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        return total / max(1, count)


def measure_retention(model, tokenizer, stream: Sequence[ProbedText], later: Sequence[int] = DEFAULT_LATER,
                      lm_texts: Sequence[str] = (), seed: int = 0, bank: Bank | None = None,
                      progress: bool = True, baseline: bool = True) -> dict:
    """The baseline, the retention curve (and with a bank the bank's curve) and the LM loss (see the module
    docstring) as a JSON-able dict.

    stream: the documents in injection order; those with probes are asked (a probed document at stream
    position i reaches n later injections only if i + n < len(stream)). progress: show a progress bar.
    baseline: ask the no-injection baseline first (without it, "baseline_accuracy" is None).
    """
    later = sorted(set(later))
    runner = QueryRunner(model, tokenizer, seed)
    probed_steps = {i for i, doc in enumerate(stream) if doc.probes}
    all_probes = [p for doc in stream for p in doc.probes]
    if not all_probes:
        raise ValueError("no document in the stream carries probes")
    max_new_tokens = max(len(runner.encode(" " + a)) for _, a in all_probes) + 2
    saved = model.memory_state()
    try:
        lm_loss = runner.lm_loss(lm_texts) if lm_texts else None
        baseline_hits = _hits(all_probes, runner.answers_to(all_probes, max_new_tokens)) if baseline else []
        last_needed = max(probed_steps) + max(later)
        hits: dict[int, list[bool]] = {n: [] for n in later}
        bank_hits: dict[int, list[bool]] = {n: [] for n in later}
        answers: list[dict] = []
        for step, doc in enumerate(tqdm(stream[: last_needed + 1], desc="retention", unit="injection",
                                    disable=not progress)):
            for chunk, (text, tokens) in enumerate(runner.inject(doc.text)):
                if bank is not None:
                    bank.add(f"{step}#{chunk}", text, tokens)
            asked = [(n, step - n) for n in later if step - n in probed_steps]
            questions = [(n, index, p) for n, index in asked for p in stream[index].probes]
            if questions:
                probes = [p for _, _, p in questions]
                said = runner.answers_to(probes, max_new_tokens)
                pool_results = _hits(probes, said)
                bank_results = None
                if bank is not None:
                    bank_results = _hits(probes, runner.answers_to(probes, max_new_tokens, bank=bank))
                for i, (n, index, (question, truth)) in enumerate(questions):
                    hits[n].append(pool_results[i])
                    answers.append({"later": n, "document": index, "question": question, "answer": truth,
                                    "said": said[i]})
                    if bank_results is not None:
                        bank_hits[n].append(bank_results[i])
    finally:
        model.set_memory_state(saved)
    k, pool_size = model.config.num_tokens, model.config.pool_size
    fresh = _mean(hits.get(0, []))
    curve = [{
        "later": n,
        "accuracy": _mean(hits[n]),
        "questions": len(hits[n]),
        "survival": (1 - k / pool_size) ** n,
        "theory": None if fresh is None else fresh * (1 - k / pool_size) ** n,
    } for n in later]
    bank_curve = None if bank is None else [
        {"later": n, "accuracy": _mean(bank_hits[n]), "questions": len(bank_hits[n])} for n in later
    ]
    return {
        "documents": len(probed_steps),
        "questions_per_point": len(all_probes),
        "num_tokens": k,
        "pool_size": pool_size,
        "baseline_accuracy": _mean(baseline_hits),
        "fresh_accuracy": fresh,
        "curve": curve,
        "bank_curve": bank_curve,
        "lm_loss": lm_loss,
        "lm_perplexity": None if lm_loss is None else float(torch.tensor(lm_loss).exp()),
        "answers": answers,
    }


def format_table(result: dict) -> str:
    """The curve as a text table, with the baseline and the LM loss."""
    lines = [f"K = {result['num_tokens']} tokens per injection, N = {result['pool_size']} "
             f"({result['documents']} documents, {result['questions_per_point']} questions)",
             f"no-injection baseline: {_percent(result['baseline_accuracy'])}",
             f"{'later':>6} {'accuracy':>9} {'theory':>9} {'survival':>9} {'questions':>9}"
             + (f" {'with bank':>10}" if result.get("bank_curve") else "")]
    bank_curve = result.get("bank_curve") or [None] * len(result["curve"])
    for point, banked in zip(result["curve"], bank_curve, strict=True):
        lines.append(f"{point['later']:>6} {_percent(point['accuracy']):>9} {_percent(point['theory']):>9} "
                     f"{point['survival']:>9.3f} {point['questions']:>9}"
                     + (f" {_percent(banked['accuracy']):>10}" if banked else ""))
    if result["lm_loss"] is not None:
        lines.append(f"held-out LM loss: {result['lm_loss']:.3f} (perplexity {result['lm_perplexity']:.2f})")
    return "\n".join(lines)


def plot_curve(result: dict, path, title: str = "Retention after later injections") -> None:
    """Measured accuracy vs later injections, the survival theory and the baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    points = [p for p in result["curve"] if p["accuracy"] is not None]
    later = [p["later"] for p in points]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.plot(later, [p["accuracy"] for p in points], "o-", label="pool alone: measured exact match")
    banked = [p for p in result.get("bank_curve") or [] if p["accuracy"] is not None]
    if banked:
        axes.plot([p["later"] for p in banked], [p["accuracy"] for p in banked], "s-",
                  label="pool + bank retrieval")
    if result["fresh_accuracy"] is not None:
        dense = sorted(set(range(0, max(later) + 1)) | set(later)) if later else []
        survival = 1 - result["num_tokens"] / result["pool_size"]
        axes.plot(dense, [result["fresh_accuracy"] * survival**n for n in dense], "--",
                  label="theory: fresh x (1 - K/N)^n")
    axes.axhline(result["baseline_accuracy"], color="grey", linestyle=":", label="no-injection baseline")
    axes.set_xscale("symlog", linthresh=1)
    axes.set_xlim(left=0)
    axes.set_xlabel("later injections n")
    axes.set_ylabel("exact-match accuracy")
    axes.set_ylim(0, 1.02)
    axes.set_title(f"{title} (K={result['num_tokens']}, N={result['pool_size']})")
    axes.legend(loc="center right" if banked else "upper right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _hits(probes: Sequence[tuple[str, str]], answers: Sequence[str]) -> list[bool]:
    return [answers_match(said, truth) for said, (_, truth) in zip(answers, probes, strict=True)]


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
