"""The training recipe of the default MemoryLLM: a reader first, then learning to store and look up by name.

Stage A (reader, no memory): rows of one to eight biographies, then questions and answers about people
among them; loss weight 1 on answer tokens and on the biographies (names repeat in every sentence, which
teaches copying), `context_weight` on the questions; plus plain LM on filler text. Without this stage,
memory training from scratch stays at chance.

Stage B (through memory): `streams` knowledge streams run side by side, each with its own running pool
(batched injections, `MemoryLLM.batched_updated_memory`). Every step, each stream injects a few contexts
(biographies, sometimes unrelated filler) with gradients flowing through every injection; then one row
per stream asks about people of this episode at every position (not only the newest) and about people of
earlier episodes whose tokens sit further back in its pool, and models a filler paragraph, all through
`forward(memory=pools)`. Answering therefore needs lookup by name, not recency. The number of contexts
per episode grows with a curriculum.

The `rich` preset (the free-wording stream) adds: a plain start (`plain_steps`: plain documents, whole
words; binding to names is learned there, where every sentence names its person before the value), rows
of random tokens said twice (`copy_rows`: copying months and numbers), word-piece dropout on scored texts
(`text_dropout`), questions further back (`max_old_age`), and in stage B rows that ask about one of a
few archived entries retrieved after the pool, as `ckl serve` lays out bank entries (`bank_rows`), and
rows that keep reading biographies in the prompt as stage A did (`prompt_rows`). `rich-ask-all` is its
stage B alone, started from a rich checkpoint, asking every question about each fresh person. `rich-vf`
is the candidate next recipe: the plain start's last steps state values before names (`value_first_steps`:
reading a value before knowing whose it is), every question asked in stage B, made-up words
(`word_noise`), filler read in whole words (`filler_dropout` off), and questions in phrasings built from
parts (`built_question_share`, synthetic/question_grammar.py).

The recipe is data-agnostic: a `Corpus` gives documents with their question/answer pairs and filler
texts (training/corpus.py builds the default one from the synthetic biographies). Runs go through
`deepspeed.initialize` with the ZeRO stage of a JSON config; device and dtype come from the TrainConfig.
"""

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.distributed import prepare_distributed_env, resolve_device
from model.memory_pool import MemoryState
from model.memoryllm import MemoryLLM, MemoryLLMConfig
from model.prompts import format_question
from model.tokenizer import SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

DEFAULT_DS_CONFIG = Path(__file__).with_name("ds_config.json")
TRAINER_STATE_FILE = "trainer_state.pt"
TRAINING_SUMMARY_FILE = "training.json"
PROGRESS_METRICS = (
    "loss", "answer_exact_single", "answer_exact_among", "answer_exact_fresh", "answer_exact_older",
    "answer_exact_bank", "answer_exact_prompt",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run: model shape, memory size, recipe, schedule."""

    # model
    vocab_size: int = 2048  # small: attribute values are several tokens (see reader_loss)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    num_tokens: int = 128  # K, tokens per injection (>= a biography's length: every token is stored)
    num_blocks: int = 16  # N = num_blocks x K, so (1 - K/N)^n decays by 1/16 per injection
    max_position_embeddings: int = 2560
    drop_memory_per_layer: bool = True
    # recipe
    reader_steps: int = 1700  # stage A (binding_step..reader_steps: phase 2)
    memory_steps: int = 1500  # stage B
    reader_batch: int = 8  # rows per stage-A step
    # stage A, phase 1 (reading): rows of 1..reader_max_people biographies (ramped over curriculum_steps)
    reader_max_people: int = 2
    reader_questions: int = 8  # Q/A per row, about the biographies in it
    context_weight: float = 0.2  # loss weight of question tokens (answers: 1)
    reader_text_weight: float = 1.0  # loss weight of the biographies (names repeat: learns copying)
    # stage A, phase 2 (binding) from step binding_step: the person asked about among more others
    binding_step: int = 1000
    reader_max_people_after: int = 8  # ramped up from reader_max_people over curriculum_steps
    reader_questions_after: int = 16
    reader_text_weight_after: float = 0.2  # the answers now dominate the loss
    filler_rows: int = 2  # stage A: filler LM rows per step
    streams: int = 8  # stage B: independent knowledge streams (running pools) trained side by side
    max_contexts: int = 4  # stage B: contexts injected per stream and step grow from 1 to this
    filler_share: float = 0.25  # ... each one an unrelated filler paragraph with this probability
    curriculum_steps: int = 300  # steps (of each stage) over which the numbers of contexts grow
    questions_per_person: int = 2  # stage B: questions about each person of the episode
    old_questions: int = 4  # questions about people of earlier episodes still in the pool
    max_old_age: int = 12  # ... injected at most this many injections ago
    bank_rows: int = 0  # stage B: rows per step asking about a bank entry retrieved after the pool
    bank_entries: int = 4  # ... 1 to this many archived entries retrieved (the one asked about among them)
    bank_archive: int = 32  # ... archived entries (a biography's memory tokens) kept per stream
    prompt_rows: int = 0  # stage B: rows per step that read biographies in the prompt (no memory)
    # optimisation
    lr: float = 3e-3
    memory_lr_scale: float = 0.5  # stage B learning rate = lr x this
    warmup_steps: int = 50
    cooldown_steps: int = 400  # stage B's last steps, learning rate decaying linearly to 0
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 100
    device: str = "auto"  # "auto": cuda if available, else cpu
    dtype: str = "float32"
    tokenizer_people: int = 4000  # biographies the tokenizer is trained on (plus filler)
    # data (training/corpus.py); the defaults are the committed model's recipe
    corpus: str = "bios"  # "bios": six templates per attribute; "rich": free wording (synthetic/rich_bios.py)
    scramble_share: float = 0.0  # rich: share of attribute sentences stated among random words
    word_noise: float = 0.0  # rich: chance that a word of a (not plain) rendering or question is made up
    built_question_share: float = 0.0  # rich: chance that a (not plain) question is a built phrasing
    built_questions_from: int = 0  # ... from this step on (synthetic/question_grammar.py)
    date_part_questions: bool = False  # rich: also ask a birth date's month, day and year
    plain_steps: int = 0  # stage A's first steps: plain documents (corpus.document(plain)), whole words
    value_first_steps: int = 0  # ... the last of them: each value stated first with chance VALUE_FIRST_SHARE
    copy_rows: int = 0  # stage A: rows per step of random tokens said twice, scored on the repeat
    copy_length: int = 32  # ... tokens said in each half
    text_dropout: float = 0.0  # chance that a word of a scored text is split at a random point
    filler_dropout: bool = True  # ... filler LM rows included
    init_from: str = ""  # start from the weights and tokenizer of this checkpoint directory

    def __post_init__(self):
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}, got {self.corpus!r}")
        if not 0.0 <= self.text_dropout < 1.0 or not 0.0 <= self.word_noise < 1.0:
            raise ValueError("text_dropout and word_noise must be in [0, 1)")
        if not 0.0 <= self.scramble_share <= 1.0:
            raise ValueError("scramble_share must be in [0, 1]")
        if not 0.0 <= self.built_question_share <= 1.0:
            raise ValueError("built_question_share must be in [0, 1]")
        if not 0 <= self.value_first_steps <= self.plain_steps:
            raise ValueError("value_first_steps must be in [0, plain_steps]: they are the plain start's last")

    @property
    def total_steps(self) -> int:
        return self.reader_steps + self.memory_steps


CORPORA = ("bios", "rich")
VALUE_FIRST_SHARE = 0.5  # the value-first phase: chance that a plain sentence states its value first
# Knobs that only stage B reads: a run resumed before stage B began may change them.
STAGE_B_FIELDS = ("memory_lr_scale", "streams", "max_contexts", "filler_share", "questions_per_person",
                  "old_questions", "max_old_age", "cooldown_steps", "bank_rows", "bank_entries",
                  "bank_archive", "prompt_rows")


def value_first_share(config: TrainConfig, step: int) -> float:
    """The chance that a plain sentence states its value first at `step`: VALUE_FIRST_SHARE in the plain
    start's last `value_first_steps`, else 0 (full renderings keep the stream's own mix)."""
    in_phase = config.plain_steps - config.value_first_steps <= step < config.plain_steps
    return VALUE_FIRST_SHARE if in_phase else 0.0


def built_question_share(config: TrainConfig, step: int) -> float:
    """The chance that a question of a (not plain) document is a built phrasing at `step`."""
    return config.built_question_share if step >= config.built_questions_from else 0.0


def cuts_words(config: TrainConfig, step: int, filler: bool) -> bool:
    """Whether scored text at `step` gets word-piece dropout (`text_dropout`): never in the plain start,
    which reads whole words, and on filler text only with `filler_dropout`."""
    return step >= config.plain_steps and (config.filler_dropout or not filler)


PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    # the free-wording recipe: rich stream, a plain start, date parts, copy rows, word-piece dropout,
    # longer stages, questions about people up to N/K x 3 injections back, rows that read bank entries,
    # and in stage B rows that read in the prompt
    "rich": TrainConfig(
        corpus="rich", scramble_share=0.3, date_part_questions=True, plain_steps=2000, copy_rows=2,
        text_dropout=0.1, reader_steps=3600, memory_steps=3600, max_old_age=48, bank_rows=4, prompt_rows=2,
    ),
    # a few-step smoke run (tests, CI): same recipe, tiny shapes
    "tiny": TrainConfig(
        vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, num_tokens=16,
        num_blocks=4, max_position_embeddings=320, reader_steps=3, memory_steps=3, reader_batch=2,
        reader_max_people=2, reader_questions=4, streams=2, max_contexts=2, old_questions=2, warmup_steps=2,
        curriculum_steps=2, cooldown_steps=2, checkpoint_every=3, tokenizer_people=200,
    ),
}
# ... and the rich recipe's smoke run
PRESETS["tiny-rich"] = dataclasses.replace(
    PRESETS["tiny"], corpus="rich", scramble_share=0.3, date_part_questions=True, plain_steps=2, copy_rows=1,
    copy_length=4, text_dropout=0.1, max_old_age=6, bank_rows=1, bank_entries=1, bank_archive=4,
    prompt_rows=1, value_first_steps=1,
)
# stage B of the rich recipe again, from a rich checkpoint (--init-from), asking every question about each
# freshly written person (2 of 8 leave three quarters of a write unsupervised); model/rich's second command
PRESETS["rich-ask-all"] = dataclasses.replace(
    PRESETS["rich"], reader_steps=0, memory_steps=1500, cooldown_steps=300, questions_per_person=8,
)
# the candidate next rich recipe (docs/rich_history.md, "value first"): a longer plain start whose last
# 1,200 steps state values first, every question asked in stage B, made-up words, whole-word filler, and
# half the questions built phrasings from step 4,000 (where the run in the docs turned them on)
PRESETS["rich-vf"] = dataclasses.replace(
    PRESETS["rich"], plain_steps=3200, value_first_steps=1200, reader_steps=4800, questions_per_person=8,
    word_noise=0.15, filler_dropout=False, built_question_share=0.5, built_questions_from=4000,
)


class Corpus(Protocol):
    """Where training text comes from. Every call draws from `rng` only (so runs are deterministic)."""

    def document(self, rng: random.Random, plain: bool = False, value_first: float = 0.0, built: float = 0.0
                 ) -> tuple[str, list[tuple[str, str]]]:
        """A fact-bearing document (a biography) and its (question, answer) pairs; `plain`: its easiest
        rendering, each value stated before the name with chance `value_first`; else each question a built
        phrasing with chance `built`."""

    def filler(self, rng: random.Random) -> str:
        """Plain text with no facts to learn."""


def build_model(config: TrainConfig, vocab_size: int) -> MemoryLLM:
    """A fresh MemoryLLM of the config's shape (tied embeddings, uninitialised pool)."""
    return MemoryLLM(model_config(config, vocab_size))


def model_config(config: TrainConfig, vocab_size: int) -> MemoryLLMConfig:
    """The MemoryLLM config of a TrainConfig's shape."""
    pool_size = config.num_blocks * config.num_tokens
    return MemoryLLMConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings,
        num_tokens=config.num_tokens, num_blocks=config.num_blocks, num_memory_tokens=pool_size,
        drop_memory_per_layer=config.drop_memory_per_layer, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
    )


# --------------------------------------------------------------------------------------------- batches


@dataclass
class Rows:
    """Token rows with per-token loss weights, padded into one batch by `to_batch`; `answers` marks the
    answer spans (row, start, end, tag) that the exact-answer metrics score."""

    ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    answers: list[tuple[int, int, int, str]] = field(default_factory=list)

    def add(self, ids: list[int], weights: list[float]) -> None:
        self.ids.append(ids)
        self.weights.append(weights)


class RowBuilder:
    """One row assembled piece by piece, remembering where its answers are."""

    def __init__(self):
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.answers: list[tuple[int, int, str]] = []

    def text(self, piece: tuple[list[int], list[float]]) -> None:
        self.ids += piece[0]
        self.weights += piece[1]

    def qa(self, piece: tuple[list[int], list[float], int], tag: str) -> None:
        ids, weights, answer_length = piece
        end = len(self.ids) + len(ids)
        self.text((ids, weights))
        self.answers.append((end - answer_length, end, tag))

    def add_to(self, rows: Rows) -> None:
        row = len(rows.ids)
        rows.add(self.ids, self.weights)
        rows.answers += [(row, start, end, tag) for start, end, tag in self.answers]


def right_padded(rows: Sequence[Sequence[float]], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Rows of different lengths as one (B, T) tensor, right-padded with zeros."""
    padded = torch.zeros(len(rows), max(map(len, rows)), dtype=dtype)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return padded


def to_batch(rows: Rows, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, weights), right-padded with id 0 and weight 0: each (B, T)."""
    ids = right_padded(rows.ids)
    mask = right_padded([[1] * len(row) for row in rows.ids])
    weights = right_padded(rows.weights, torch.float32)
    return ids.to(device), mask.to(device), weights.to(device)


def weighted_loss(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Weighted next-token cross-entropy (the weight of token t+1 scores its prediction at t); also the
    per-token correctness of the argmax, for answer accuracy."""
    logits, targets, weights = logits[:, :-1], ids[:, 1:], weights[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (B, T-1)
    loss = (losses * weights).sum() / weights.sum().clamp(min=1e-6)
    return loss, logits.argmax(-1) == targets


def exact_answer_rates(correct: torch.Tensor, answers: Sequence[tuple[int, int, int, str]]) -> dict:
    """Teacher-forced share of answers whose every token is predicted right, per tag: answer_exact_<tag>.
    correct: (B, T-1) from `weighted_loss`; answers: (row, start, end, tag) spans of token positions."""
    hits: dict[str, list[bool]] = {}
    for row, start, end, tag in answers:
        hits.setdefault(tag, []).append(bool(correct[row, start - 1 : end - 1].all()))
    return {f"answer_exact_{tag}": sum(h) / len(h) for tag, h in hits.items()}


def copy_row(rng: random.Random, length: int, vocab_size: int) -> tuple[list[int], list[float]]:
    """Random ordinary tokens said twice, scored on the repeat only: a row that rewards copying any token
    (months and numbers too, which biographies never repeat)."""
    tokens = [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(length)]
    return tokens + tokens, [0.0] * length + [1.0] * length


class Encoder:
    """Text -> ids (no special tokens: memory and queries carry none) and Q/A rows with loss weights.

    Word-piece dropout: `text(..., rng)` cuts each word, with probability `dropout`, at a random point and
    encodes the halves apart, so word pieces that whole words hide get trained too (the tokenizer's own
    BPE-dropout has no seed; this draws from the caller's rng, so runs stay reproducible)."""

    def __init__(self, tokenizer, context_weight: float, dropout: float = 0.0):
        self.tokenizer = tokenizer
        self.context_weight = context_weight
        self.dropout = dropout

    def __call__(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def qa(self, question: str, answer: str) -> tuple[list[int], list[float], int]:
        """The Q/A of model.prompts: the prompt as evaluation encodes it, then the answer and its newline;
        also the length of that reply (the answer span)."""
        prompt, reply = self(format_question(question)), self(f" {answer.strip()}\n")
        return prompt + reply, [self.context_weight] * len(prompt) + [1.0] * len(reply), len(reply)

    def text(self, text: str, weight: float, rng: random.Random | None = None
             ) -> tuple[list[int], list[float]]:
        """A scored text: its ids and weights; with an rng, words are cut with the dropout probability."""
        ids = self(text) if rng is None or self.dropout == 0 else self._with_cut_words(text, rng)
        return ids, [weight] * len(ids)

    def _with_cut_words(self, text: str, rng: random.Random) -> list[int]:
        backend = self.tokenizer.backend_tokenizer
        ids = []
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            if len(word) > 1 and rng.random() < self.dropout:
                cut = rng.randint(1, len(word) - 1)
                halves = (word[:cut], word[cut:])
            else:
                halves = (word,)
            ids += [token.id for half in halves for token in backend.model.tokenize(half)]
        return ids


# --------------------------------------------------------------------------------------------- trainer


@dataclass
class PoolEntry:
    """A person whose biography went into the running pool, and when (global injection index)."""

    qas: list[tuple[str, str]]
    injection: int


@dataclass
class BankEntry:
    """A biography's memory tokens [L, K, d] as the bank keeps them (float16), and its questions."""

    tokens: torch.Tensor
    qas: list[tuple[str, str]]


class Trainer:
    """One run: model + DeepSpeed engine + the running memory pool of stage B + all random state."""

    def __init__(self, config: TrainConfig, corpus: Corpus, tokenizer, model: MemoryLLM,
                 ds_config: dict, device: torch.device):
        import deepspeed

        self.config, self.corpus, self.tokenizer = config, corpus, tokenizer
        self.encode = Encoder(tokenizer, config.context_weight, config.text_dropout)
        self.device = device
        dtype = getattr(torch, config.dtype)
        model.to(device=device, dtype=dtype)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.98))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=parameters, config=ds_config
        )
        self.model: MemoryLLM = self.engine.module
        self.step = 0
        self.data_rng = random.Random(f"ckl-train-data:{config.seed}")
        self.drop_generator = torch.Generator().manual_seed(config.seed)
        self.pools: torch.Tensor | None = None  # stage B: every stream's running pool [S, L, N, d], no graph
        self.pool_people: list[list[PoolEntry]] = []  # ... and the people in it
        self.archives: list[list[BankEntry]] = [[] for _ in range(config.streams)]  # stage B: bank rows
        self.injections = 0
        self.wall_seconds = 0.0

    # ------------------------------------------------------------------------------------------ stages

    def learning_rate(self) -> float:
        """Each stage: linear warmup, then constant (stage B at lr x memory_lr_scale); the last
        `cooldown_steps` of stage B decay linearly towards 0. Nothing before the cooldown depends on the
        stages' lengths, so a stage can be extended by resuming with a longer preset."""
        c = self.config
        in_reader = self.step < c.reader_steps
        t = self.step if in_reader else self.step - c.reader_steps
        peak = c.lr if in_reader else c.lr * c.memory_lr_scale
        cooldown = 1.0 if in_reader else min(1.0, (c.total_steps - self.step) / max(1, c.cooldown_steps))
        return peak * min(1.0, (t + 1) / c.warmup_steps) * cooldown

    def reader_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage A: rows of biographies, then Q/A about people among them (shuffled); filler LM rows.
        Phase 1 (reading) has 1-2 biographies per row and weighs them fully; phase 2 (binding) has up to
        reader_max_people_after, so the reader must find the person asked about among several, with the
        answers dominating the loss."""
        c, rng = self.config, self.data_rng
        if self.step < c.binding_step:
            low, high, ramp = 1, c.reader_max_people, self.step
            text_weight, questions = c.reader_text_weight, c.reader_questions
        else:
            low, high, ramp = c.reader_max_people, c.reader_max_people_after, self.step - c.binding_step
            text_weight, questions = c.reader_text_weight_after, c.reader_questions_after
        max_people = low + round(min(1.0, ramp / max(1, c.curriculum_steps)) * (high - low))
        plain = self.step < c.plain_steps
        rows = self._reading_rows(c.reader_batch, max_people, text_weight, questions, plain)
        for _ in range(c.filler_rows):
            rows.add(*self.encode.text(self.corpus.filler(rng), 1.0, self._cut_rng(filler=True)))
        for _ in range(c.copy_rows):
            rows.add(*copy_row(rng, c.copy_length, len(self.tokenizer)))
        ids, mask, weights = to_batch(rows, self.device)
        logits = self.engine(input_ids=ids, attention_mask=mask).logits
        loss, correct = weighted_loss(logits, ids, weights)
        return loss, exact_answer_rates(correct, rows.answers)

    def _reading_rows(self, count: int, max_people: int, text_weight: float, questions: int, plain: bool,
                      tag: str = "") -> Rows:
        """`count` rows of 1..max_people biographies in the prompt, then up to `questions` Q/A about people
        among them, tagged `tag` (default: "single" or "among" by the number of biographies)."""
        rng, cut_rng = self.data_rng, self._cut_rng()
        value_first = value_first_share(self.config, self.step)
        built = built_question_share(self.config, self.step)
        rows = Rows()
        for _ in range(count):
            documents = [self.corpus.document(rng, plain, value_first, built)
                         for _ in range(rng.randint(1, max_people))]
            qas = [qa for _, doc_qas in documents for qa in doc_qas]
            row = RowBuilder()
            for text, _ in documents:
                row.text(self.encode.text(text + "\n", text_weight, cut_rng))
            row_tag = tag or ("single" if len(documents) == 1 else "among")
            for question, answer in rng.sample(qas, min(len(qas), questions)):
                row.qa(self.encode.qa(question, answer), row_tag)
            row.add_to(rows)
        return rows

    def _cut_rng(self, filler: bool = False) -> random.Random | None:
        """The rng that cuts words of a scored text (word-piece dropout), or None where it reads whole
        words (`cuts_words`)."""
        return self.data_rng if cuts_words(self.config, self.step, filler) else None

    def _num_contexts(self) -> int:
        """Contexts every stream injects this step: at most 1 at the start of stage B, growing linearly to
        max_contexts over `curriculum_steps`."""
        c = self.config
        progress = min(1.0, (self.step - c.reader_steps) / max(1, c.curriculum_steps))
        return self.data_rng.randint(1, 1 + round(progress * (c.max_contexts - 1)))

    def _inject(self, pools: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """One context into each stream's pool (a batched injection, gradients flowing)."""
        encoded = [self.encode(text) for text in texts]
        ids = right_padded(encoded)
        lengths = torch.tensor([len(row) for row in encoded])
        self.injections += 1
        return self.model.batched_updated_memory(ids.to(self.device), lengths, pools, self.drop_generator)

    def _warm_pools(self) -> torch.Tensor:
        """Every stream's first pool: tiled from one filler paragraph (the model's own pool is kept
        uninitialised in training), then filled by more filler injections; no gradients."""
        c = self.config
        with torch.no_grad():
            pools = torch.stack([
                self.model.updated_memory(torch.tensor(self.encode(self.corpus.filler(self.data_rng)),
                                                       device=self.device)[None])
                for _ in range(c.streams)
            ])
            for _ in range(c.num_blocks):
                pools = self._inject(pools, [self.corpus.filler(self.data_rng) for _ in range(c.streams)])
        return pools

    def memory_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Stage B: every stream injects a few biographies (and fillers) with gradients, then one row per
        stream asks about people of this episode (any position) and of earlier episodes still in its pool,
        and models a filler paragraph, all through that stream's memory."""
        c, rng = self.config, self.data_rng
        if self.pools is None:
            self.pools = self._warm_pools()
            self.pool_people = [[] for _ in range(c.streams)]
        num_contexts, built = self._num_contexts(), built_question_share(c, self.step)
        plans = [[self.corpus.filler(rng) if rng.random() < c.filler_share
                  else self.corpus.document(rng, built=built) for _ in range(num_contexts)]
                 for _ in range(c.streams)]
        pools = self.pools
        episodes: list[list[PoolEntry]] = [[] for _ in range(c.streams)]
        for position in range(num_contexts):
            contexts = [plan[position] for plan in plans]
            pools = self._inject(pools, [ctx if isinstance(ctx, str) else ctx[0] for ctx in contexts])
            for stream, ctx in enumerate(contexts):
                if not isinstance(ctx, str):
                    episodes[stream].append(PoolEntry(qas=ctx[1], injection=self.injections - 1))
                    if c.bank_rows:
                        self._archive(stream, pools[stream, :, -c.num_tokens :], ctx[1])
        rows = Rows()
        for stream in range(c.streams):
            asked = []
            for entry in episodes[stream]:
                chosen = rng.sample(entry.qas, min(c.questions_per_person, len(entry.qas)))
                asked += [(qa, self._age_tag(entry)) for qa in chosen]
            older = [e for e in self.pool_people[stream] if self._age(e) <= c.max_old_age]
            for entry in rng.sample(older, min(c.old_questions, len(older))):
                asked.append((rng.choice(entry.qas), self._age_tag(entry)))
            rng.shuffle(asked)
            row = RowBuilder()
            for qa, tag in asked:
                row.qa(self.encode.qa(*qa), tag)
            row.text(self.encode.text(self.corpus.filler(rng), 1.0, self._cut_rng(filler=True)))
            row.add_to(rows)
        ids, mask, weights = to_batch(rows, self.device)
        logits = self.engine(input_ids=ids, attention_mask=mask, memory=pools).logits
        loss, correct = weighted_loss(logits, ids, weights)
        metrics = exact_answer_rates(correct, rows.answers)
        parts = [(loss, c.streams)]
        if c.bank_rows and all(len(archive) >= c.bank_entries for archive in self.archives):
            bank_loss, bank_metrics = self._bank_loss(pools)
            parts.append((bank_loss, c.bank_rows))
            metrics |= bank_metrics
        if c.prompt_rows:
            prompt_loss, prompt_metrics = self._prompt_loss()
            parts.append((prompt_loss, c.prompt_rows))
            metrics |= prompt_metrics
        loss = sum(part * rows for part, rows in parts) / sum(rows for _, rows in parts)
        self.pools = pools.detach()
        self.pool_people = [[e for e in people + episode if self._age(e) <= c.max_old_age]
                            for people, episode in zip(self.pool_people, episodes, strict=True)]
        return loss, {**metrics, "contexts": num_contexts}

    def _archive(self, stream: int, tokens: torch.Tensor, qas: list[tuple[str, str]]) -> None:
        """Keep a biography's memory tokens as a bank entry of the stream (the newest bank_archive)."""
        archive = self.archives[stream]
        archive.append(BankEntry(tokens.detach().to(torch.float16), qas))
        del archive[: -self.config.bank_archive]

    def _bank_loss(self, pools: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Rows that ask about one of 1..bank_entries archived entries retrieved after a stream's pool, in
        the layout `ckl serve` uses ([bos, pool, retrieved, question]); the person may long have left it."""
        c, rng = self.config, self.data_rng
        count = rng.randint(1, c.bank_entries)
        streams, retrieved, rows = [], [], Rows()
        for _ in range(c.bank_rows):
            stream = rng.randrange(c.streams)
            entries = rng.sample(self.archives[stream], count)
            row = RowBuilder()
            row.qa(self.encode.qa(*rng.choice(rng.choice(entries).qas)), "bank")
            row.add_to(rows)
            streams.append(stream)
            retrieved.append(torch.cat([e.tokens for e in entries], dim=1))
        ids, mask, weights = to_batch(rows, self.device)
        retrieved_memory = torch.stack(retrieved).to(pools.dtype)
        logits = self.engine(input_ids=ids, attention_mask=mask, memory=pools[streams],
                             retrieved_memory=retrieved_memory).logits
        loss, correct = weighted_loss(logits, ids, weights)
        return loss, exact_answer_rates(correct, rows.answers)

    def _prompt_loss(self) -> tuple[torch.Tensor, dict[str, float]]:
        """Rows that read biographies in the prompt, as stage A's binding phase does, with no memory: stage
        B trains reading through memory only, and without these rows reading in the prompt erodes."""
        c = self.config
        rows = self._reading_rows(c.prompt_rows, c.reader_max_people_after, c.reader_text_weight_after,
                                  c.reader_questions_after, plain=False, tag="prompt")
        ids, mask, weights = to_batch(rows, self.device)
        logits = self.engine(input_ids=ids, attention_mask=mask).logits
        loss, correct = weighted_loss(logits, ids, weights)
        return loss, exact_answer_rates(correct, rows.answers)

    def _age(self, entry: PoolEntry) -> int:
        """Injections into the pool after this person's (0: the newest)."""
        return self.injections - 1 - entry.injection

    def _age_tag(self, entry: PoolEntry) -> str:
        return "fresh" if self._age(entry) == 0 else "older"

    def train_step(self) -> dict[str, float]:
        """One optimiser step of the current stage; returns its metrics."""
        started = time.perf_counter()
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        in_reader = self.step < self.config.reader_steps
        loss, metrics = self.reader_loss() if in_reader else self.memory_loss()
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        self.wall_seconds += time.perf_counter() - started
        return {"loss": loss.item(), "lr": lr, "stage": 0 if in_reader else 1, **metrics}

    # ----------------------------------------------------------------------------------------- checkpoints

    def save(self, directory: Path, extra: dict | None = None) -> None:
        """A checkpoint that is both a usable model (running pool as its memory) and resumable."""
        directory.mkdir(parents=True, exist_ok=True)
        saved_state = self.model.memory_state()
        if self.pools is not None:  # the saved model's memory: the first stream's pool
            self.model.set_memory_state(MemoryState(self.pools[0], 0, self.injections, True))
        self.model.save_pretrained(directory)
        self.model.set_memory_state(saved_state)
        save_tokenizer(self.tokenizer, directory)
        torch.save({
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_rng.getstate(),
            "drop_generator": self.drop_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "pools": self.pools,
            "pool_people": [[dataclasses.asdict(e) for e in people] for people in self.pool_people],
            "archives": [[(e.tokens.cpu(), e.qas) for e in archive] for archive in self.archives],
            "injections": self.injections,
            "wall_seconds": self.wall_seconds,
            "config": dataclasses.asdict(self.config),
        }, directory / TRAINER_STATE_FILE)
        summary = {"config": dataclasses.asdict(self.config), "step": self.step,
                   "wall_seconds": round(self.wall_seconds, 1), **(extra or {})}
        (directory / TRAINING_SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    def restore(self, directory: Path) -> None:
        """Continue from `save`'s trainer state (the weights were loaded with the model)."""
        state = torch.load(directory / TRAINER_STATE_FILE, weights_only=False)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_rng.setstate(state["data_rng"])
        self.drop_generator.set_state(state["drop_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.pools = None if state["pools"] is None else state["pools"].to(self.device)
        self.pool_people = [[PoolEntry(**e) for e in people] for people in state["pool_people"]]
        self.archives = [[BankEntry(tokens.to(self.device), qas) for tokens, qas in archive]
                         for archive in state.get("archives", self.archives)]
        self.injections = state["injections"]
        self.wall_seconds = state["wall_seconds"]


# ------------------------------------------------------------------------------------------------- run


def load_ds_config(path: Path = DEFAULT_DS_CONFIG) -> dict:
    """The DeepSpeed JSON config (ZeRO stage, clipping, batch bookkeeping)."""
    return json.loads(Path(path).read_text())


def _resume_mismatch(saved: dict, config: TrainConfig, step: int) -> dict[str, tuple]:
    """The config fields a resumed run changes but must share, as {field: (saved, new)}. Free to change:
    the stage lengths (a stage can be extended, or ended at a checkpoint still inside it), the checkpoint
    interval, and stage B's knobs while stage B has not begun. A field the saved config lacks (added to
    the recipe later) counts as its default."""
    free = {"reader_steps", "memory_steps", "checkpoint_every", "init_from"}  # init_from: the start only
    if step < saved["reader_steps"]:
        free |= set(STAGE_B_FIELDS)
    defaults = dataclasses.asdict(TrainConfig())
    new = dataclasses.asdict(config)
    return {k: (saved.get(k, defaults[k]), v) for k, v in new.items()
            if k not in free and saved.get(k, defaults[k]) != v}


def make_trainer(config: TrainConfig, corpus: Corpus, out_dir: Path, resume: bool, ds_config: dict,
                 cache_dir: Path) -> Trainer:
    """A fresh run (tokenizer trained on the corpus, new model), one that starts from the weights and
    tokenizer of config.init_from, or one resumed from out_dir."""
    prepare_distributed_env(cache_dir)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    if resume:
        if not (out_dir / TRAINER_STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: no {TRAINER_STATE_FILE} in {out_dir}")
        summary = json.loads((out_dir / TRAINING_SUMMARY_FILE).read_text())
        mismatch = _resume_mismatch(summary["config"], config, summary["step"])
        if mismatch:
            raise ValueError(f"--resume: {out_dir} was trained with another config (saved, new): {mismatch}")
        # the run keeps the record of the checkpoint it started from
        started_from = config.init_from or summary["config"].get("init_from", "")
        config = dataclasses.replace(config, init_from=started_from)
        tokenizer, model = _load_checkpoint(out_dir, config)
        trainer = Trainer(config, corpus, tokenizer, model, ds_config, device)
        trainer.restore(out_dir)
        if summary["config"]["reader_steps"] != config.reader_steps and trainer.step > config.reader_steps:
            raise ValueError(f"--resume: {out_dir} is at step {trainer.step}, past the new end of stage A")
        return trainer
    if config.reader_steps == 0 and not config.init_from:
        raise ValueError("this recipe has no stage A (it trains only the memory): start it from a "
                         "trained checkpoint with --init-from")
    if config.init_from:
        tokenizer, model = _load_checkpoint(Path(config.init_from), config)
        _check_shape(model.config, model_config(config, len(tokenizer)), config.init_from)
        return Trainer(config, corpus, tokenizer, model, ds_config, device)
    tokenizer_rng = random.Random(f"ckl-train-tokenizer:{config.seed}")
    texts = [corpus.document(tokenizer_rng)[0] for _ in range(config.tokenizer_people)]
    texts += [format_question(q) + " " + a for _ in range(config.tokenizer_people // 4)
              for q, a in corpus.document(tokenizer_rng)[1]]
    texts += [corpus.filler(tokenizer_rng) for _ in range(config.tokenizer_people)]
    tokenizer = train_tokenizer(texts, config.vocab_size)
    model = build_model(config, len(tokenizer))
    return Trainer(config, corpus, tokenizer, model, ds_config, device)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_tokens", "num_blocks", "max_position_embeddings")


def _load_checkpoint(directory: Path, config: TrainConfig) -> tuple:
    """(tokenizer, model) of a saved checkpoint, its pool left for training to pass in explicitly."""
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint (config.json) in {directory}")
    tokenizer = load_tokenizer(directory)
    model = MemoryLLM.from_pretrained(directory, torch_dtype=getattr(torch, config.dtype))
    model.set_memory_state(MemoryState(model.memory.detach(), 0, 0, False))  # training passes pools
    return tokenizer, model


def _check_shape(found: MemoryLLMConfig, wanted: MemoryLLMConfig, source: str) -> None:
    """Refuse to start from a checkpoint whose shape is not the config's."""
    differing = {f: (getattr(found, f), getattr(wanted, f)) for f in SHAPE_FIELDS
                 if getattr(found, f) != getattr(wanted, f)}
    if differing:
        raise ValueError(f"init_from {source}: the checkpoint's shape is not the preset's "
                         f"(checkpoint, preset): {differing}")


def train(trainer: Trainer, out_dir: Path, steps: int | None = None,
          log_metrics: Callable[[int, dict], None] | None = None) -> dict[str, float]:
    """Run up to `steps` steps (default: to the end of the recipe), checkpointing into out_dir every
    `checkpoint_every` steps and at the end; returns the metrics smoothed over the run (an exponential
    moving average, weight 0.05 per step), as the progress bar shows them."""
    config = trainer.config
    end = config.total_steps if steps is None else min(config.total_steps, trainer.step + steps)
    metrics: dict[str, float] = {}
    averaged: dict[str, float] = {}
    with tqdm(total=end, initial=trainer.step, desc="ckl train", unit="step") as bar:
        while trainer.step < end:
            metrics = trainer.train_step()
            for key, value in metrics.items():
                averaged[key] = value if key not in averaged else 0.95 * averaged[key] + 0.05 * value
            if log_metrics is not None:
                log_metrics(trainer.step, metrics)
            bar.set_postfix({k: f"{v:.3g}" for k, v in averaged.items() if k in PROGRESS_METRICS})
            bar.update()
            if trainer.step % config.checkpoint_every == 0 or trainer.step == end:
                trainer.save(out_dir, {"last_loss": metrics["loss"], "smoothed_metrics": averaged})
    return averaged
