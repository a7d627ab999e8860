"""Biographies in free wording: the richer knowledge stream, with wording and names held out entirely.

The people are those of synthetic/bios.py (the same attributes and value pools), with ordinary first
and last names from many cultures beside the syllable names. A biography states every attribute once,
in any order, in one of dozens of templates per attribute (synthetic/wording.py), sometimes two
attributes in one sentence; after the first mention it refers to the person by full name, surname or
pronoun; it may mention unrelated things and other people. Questions come in many phrasings.

Splits:
- "train": training names, training wording. The only split training text comes from.
- "heldout-names": held-out names (syllable and ordinary), training wording (in distribution).
- "heldout-wording": held-out names, held-out sentence templates, combined sentences, side sentences and
  question phrasings. None of these ever occurs in training text.

A `plain` rendering (one template sentence per attribute, each naming the person in full before the
value, nothing else) and `plain` questions (each attribute's first phrasing) are the easy start of the
training recipe: a small model learns to bind values to names there, where the name always comes first,
and not from the start on the full stream (docs/default_model.md). With `value_first_share`, a plain
sentence states the value before the name instead, with that chance: the recipe's value-first phase,
where a model learns to read a value before it knows whose it is. A scrambled sentence states the
value among random words, so only the value's type tells the attribute. With `word_noise`, a training
rendering's and question's own words are each, with that chance, replaced by a made-up word, as words a
model never met stand in held-out wording. Everything is deterministic in the seed and the rng state.
"""

import functools
import random
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from documents.model import Document, Probe
from synthetic import bios, wording
from synthetic.filler import lexicon as filler_lexicon

SPLITS = ("train", "heldout-names", "heldout-wording")
ORDINARY_NAME_SHARE = 0.5  # chance that a first (and, apart, a last) name is an ordinary one
COMBINE_SHARE = 0.3  # chance that an attribute shares its sentence with the next one
SIDE_SENTENCES = (0, 2)  # unrelated sentences about the person per biography (min, max)
OTHER_PERSON_SHARE = 0.3  # chance of one sentence that mentions someone else
REFERENCE_WEIGHTS = {"full": 0.3, "surname": 0.3, "pronoun": 0.4}  # mentions after the first
PRONOUNS = (("She", "Her"), ("He", "His"))
SCRAMBLE_WORDS = (3, 6)  # random words around the value and the name in a scrambled sentence
MADE_UP_SYLLABLES = (2, 3)  # consonant-vowel pairs in a made-up word (word_noise)

T = TypeVar("T")


def held_out(entries: Sequence[T]) -> tuple[T, ...]:
    """The entries at held-out positions (wording.HELDOUT_EVERY)."""
    return tuple(e for i, e in enumerate(entries) if i % wording.HELDOUT_EVERY == wording.HELDOUT_EVERY - 1)


def for_training(entries: Sequence[T]) -> tuple[T, ...]:
    """The entries that training text may use: every one not held out."""
    return tuple(e for i, e in enumerate(entries) if i % wording.HELDOUT_EVERY != wording.HELDOUT_EVERY - 1)


@dataclass(frozen=True)
class Wording:
    """What one split's texts and questions are made of."""

    sentences: dict[str, tuple[str, ...]]  # per attribute: "{name} ... {value} ..."
    combined: dict[tuple[str, str], tuple[str, ...]]  # per attribute pair (ATTRIBUTES order): two fields
    side: tuple[str, ...]  # about the person, stating no attribute
    others: tuple[str, ...]  # mentioning {other} too
    questions: dict[str, tuple[str, ...]]


@functools.cache
def wording_of(split: str) -> Wording:
    """The wording a split uses: training entries for "train" and "heldout-names", held-out ones else."""
    _check_split(split)
    pick = held_out if split == "heldout-wording" else for_training
    combined: dict[tuple[str, str], list[str]] = {}
    for template in pick(wording.COMBINED_TEMPLATES):
        fields = tuple(a for a in bios.ATTRIBUTES if "{" + a + "}" in template)
        combined.setdefault(fields, []).append(template)  # type: ignore[arg-type]
    return Wording(
        sentences={a: pick(wording.SENTENCE_TEMPLATES[a]) for a in bios.ATTRIBUTES},
        combined={pair: tuple(templates) for pair, templates in combined.items()},
        side=pick(wording.COLOUR_SENTENCES),
        others=pick(wording.OTHER_PERSON_SENTENCES),
        questions={a: pick(wording.QUESTION_TEMPLATES[a]) for a in bios.ATTRIBUTES},
    )


@functools.cache
def name_pools(split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(syllable first, syllable last, ordinary first, ordinary last) names of a split; "train" has the
    training names, both held-out splits the held-out ones."""
    _check_split(split)
    names_split = "train" if split == "train" else "heldout"
    pick = for_training if split == "train" else held_out
    first, last = bios.name_pools(names_split)
    return first, last, pick(wording.FIRST_NAMES), pick(wording.LAST_NAMES)


def _draw_name(split: str, rng: random.Random) -> tuple[str, str]:
    first, last, ordinary_first, ordinary_last = name_pools(split)
    return (rng.choice(ordinary_first if rng.random() < ORDINARY_NAME_SHARE else first),
            rng.choice(ordinary_last if rng.random() < ORDINARY_NAME_SHARE else last))


def generate_people(n: int, split: str = "train", seed: int = 0) -> list[bios.Person]:
    """n people with distinct full names from the split's names; deterministic in (split, seed), and a
    prefix of a longer draw. "heldout-names" and "heldout-wording" draw the same people."""
    _check_split(split)
    names_split = "train" if split == "train" else "heldout"
    return bios.draw_people(n, functools.partial(_draw_name, split),
                            random.Random(f"ckl-rich-bios-people:{names_split}:{seed}"))


def biography(person: bios.Person, rng: random.Random, split: str = "train", plain: bool = False,
              scramble_share: float = 0.0, word_noise: float = 0.0, value_first_share: float = 0.0) -> str:
    """One rendering of the person's biography in the split's wording (see the module docstring)."""
    words = wording_of(split)
    order = list(bios.ATTRIBUTES)
    rng.shuffle(order)
    if plain:
        return _plain_rendering(person, order, words, rng, value_first_share=value_first_share)
    templates = _attribute_sentences(order, words, rng)
    for _ in range(rng.randint(*SIDE_SENTENCES)):
        templates.insert(rng.randint(1, len(templates)), rng.choice(words.side))
    if rng.random() < OTHER_PERSON_SHARE:
        other = " ".join(_draw_name(split, rng))
        templates.insert(rng.randint(1, len(templates)), rng.choice(words.others).replace("{other}", other))
    pronoun = rng.choice(PRONOUNS)
    sentences = []
    for index, template in enumerate(templates):
        reference = person.full_name if index == 0 else _reference(person, template, pronoun, rng)
        attribute = _single_attribute(template)
        if attribute and rng.random() < scramble_share:
            sentences.append(_scrambled(attribute, reference, person, rng))
        else:
            sentences.append(_fill(noised(template, word_noise, rng), reference, person, attribute))
    return " ".join(sentences)


def probes(person: bios.Person, rng: random.Random, split: str = "train", plain: bool = False,
           word_noise: float = 0.0) -> tuple[Probe, ...]:
    """One question per attribute in ATTRIBUTES order, each in a phrasing of the split drawn from rng
    (`plain`: the split's first phrasing, drawing nothing), its words noised with `word_noise`."""
    questions = wording_of(split).questions
    phrasings = [questions[a][0] if plain else noised(rng.choice(questions[a]), word_noise, rng)
                 for a in bios.ATTRIBUTES]
    return tuple(Probe(question=phrasing.format(name=person.full_name), answer=person.attribute(a))
                 for a, phrasing in zip(bios.ATTRIBUTES, phrasings, strict=True))


TEMPLATE_KINDS = ("template", "training template")  # trials that change the sentence stating the value


@dataclass(frozen=True)
class WordingTrial:
    """One held-out question phrasing or sentence template alone in otherwise plain training wording:
    a plain rendering of each person (the template stating its attribute, for a template) and a question
    about that attribute (the phrasing, for a phrasing; else the attribute's first training phrasing).
    The "reference" trial of an attribute has training wording only; a "training template" trial tries
    a value-first template of training wording the same way, the control for held-out value-first ones."""

    attribute: str
    kind: str  # "reference", "question", "template" (held out) or "training template" (value first)
    wording: str  # the phrasing or template tried ("reference": the question asked)
    texts: tuple[str, ...]
    probes: tuple[Probe, ...]  # one per text

    @property
    def value_first(self) -> bool:
        """A template that states the value before it names the person."""
        return self.kind in TEMPLATE_KINDS and not names_first((self.wording,))


def wording_trials(n: int, seed: int = 0) -> list[WordingTrial]:
    """Per attribute: the reference trial, then one trial per held-out question phrasing, per held-out
    sentence template and per value-first training template, each over the same n held-out people with
    the same other sentences."""
    people = generate_people(n, "heldout-wording", seed)
    train, held = wording_of("train"), wording_of("heldout-wording")
    trials = []
    for attribute in bios.ATTRIBUTES:
        first = train.questions[attribute][0]
        tried = [("reference", first, first)]
        tried += [("question", phrasing, phrasing) for phrasing in held.questions[attribute]]
        tried += [("template", template, first) for template in held.sentences[attribute]]
        trained = train.sentences[attribute]
        tried += [("training template", template, first) for template in trained
                  if template not in names_first(trained)]
        for kind, tried_wording, question in tried:
            rng = random.Random(f"ckl-rich-bios-trial:{seed}:{attribute}")  # the same draws in every trial
            stated_by = {attribute: tried_wording} if kind in TEMPLATE_KINDS else {}
            texts = []
            for person in people:
                order = list(bios.ATTRIBUTES)
                rng.shuffle(order)
                texts.append(_plain_rendering(person, order, train, rng, stated_by))
            probes = tuple(Probe(question=question.format(name=p.full_name), answer=p.attribute(attribute))
                           for p in people)
            trials.append(WordingTrial(attribute, kind, tried_wording, tuple(texts), probes))
    return trials


@functools.cache
def names_first(templates: tuple[str, ...]) -> tuple[str, ...]:
    """The templates that name the person before they state the value."""
    return tuple(t for t in templates if t.index("{name}") < t.index("{value}"))


@functools.cache
def values_first(templates: tuple[str, ...]) -> tuple[str, ...]:
    """The templates that state the value before they name the person: the rest of `names_first`."""
    return tuple(t for t in templates if t not in names_first(templates))


def bio_documents(n: int, split: str = "train", seed: int = 0) -> Iterator[Document]:
    """The split's first n people as documents (source "bios", doc_ids "bios-<split>-s<seed>-<index>")."""
    rng = random.Random(f"ckl-rich-bios-text:{split}:{seed}")
    for index, person in enumerate(generate_people(n, split, seed)):
        text = biography(person, rng, split)
        yield Document(doc_id=f"{bios.SOURCE}-{split}-s{seed}-{index:07d}", text=text, source=bios.SOURCE,
                       probes=probes(person, rng, split))


def _plain_rendering(person: bios.Person, order: list[str], words: Wording, rng: random.Random,
                     stated_by: dict[str, str] | None = None, value_first_share: float = 0.0) -> str:
    """One name-first template per attribute in `order`, naming the person in full; with chance
    `value_first_share`, a template stating the value first instead. `stated_by` replaces the template of
    an attribute (the draw is made all the same)."""
    sentences = []
    for attribute in order:
        value_first = value_first_share and rng.random() < value_first_share
        template = rng.choice((values_first if value_first else names_first)(words.sentences[attribute]))
        template = (stated_by or {}).get(attribute, template)
        sentences.append(_fill(template, person.full_name, person, attribute))
    return " ".join(sentences)


def _attribute_sentences(order: list[str], words: Wording, rng: random.Random) -> list[str]:
    """A template per attribute, or per pair of neighbours in `order` where a combined one is drawn."""
    templates, index = [], 0
    while index < len(order):
        pair = tuple(a for a in bios.ATTRIBUTES if a in order[index : index + 2])
        if len(pair) == 2 and pair in words.combined and rng.random() < COMBINE_SHARE:
            templates.append(rng.choice(words.combined[pair]))
            index += 2
        else:
            templates.append(rng.choice(words.sentences[order[index]]))
            index += 1
    return templates


def _reference(person: bios.Person, template: str, pronoun: tuple[str, str], rng: random.Random) -> str:
    """How a later sentence names the person: full name, surname, or (at the sentence's start) a pronoun."""
    kinds = list(REFERENCE_WEIGHTS)
    kind = rng.choices(kinds, weights=list(REFERENCE_WEIGHTS.values()))[0]
    if kind == "pronoun" and template.startswith("{name}'s "):
        return pronoun[1] + "\0"  # "\0": the possessive pronoun replaces "{name}'s" whole
    if kind == "pronoun" and template.startswith("{name} "):
        return pronoun[0]
    return person.last_name if kind == "surname" else person.full_name


def _fill(template: str, reference: str, person: bios.Person, attribute: str) -> str:
    """The template with the reference for {name}, the attribute's value for {value} (attribute: the
    one a one-attribute template states, else "") and every attribute's value for its own field."""
    if reference.endswith("\0"):
        template, reference = template.replace("{name}'s", "{name}", 1), reference[:-1]
    values = {a: person.attribute(a) for a in bios.ATTRIBUTES}
    return template.format(name=reference, value=values[attribute] if attribute else "", **values)


@functools.cache
def _single_attribute(template: str) -> str:
    """The attribute a one-attribute template states ("" for any other template)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if "value" not in fields:
        return ""
    return next(a for a, templates in wording.SENTENCE_TEMPLATES.items() if template in templates)


def _scrambled(attribute: str, reference: str, person: bios.Person, rng: random.Random) -> str:
    """The attribute's value and the reference among random corpus words, in random order."""
    units = rng.sample(_scramble_lexicon(), rng.randint(*SCRAMBLE_WORDS))
    units += [person.attribute(attribute), reference.rstrip("\0")]
    rng.shuffle(units)
    text = " ".join(units)
    return text[0].upper() + text[1:] + "."


def noised(template: str, share: float, rng: random.Random) -> str:
    """The template with each of its own words (not a {field}), with chance `share`, replaced by a
    made-up lowercase word (capitalised where the word was), punctuation kept; share 0 draws nothing."""
    if share == 0.0:
        return template
    words = template.split(" ")
    for index, word in enumerate(words):
        core = word.strip(string.punctuation)
        if "{" in word or not core.isalpha() or rng.random() >= share:
            continue
        made_up = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")
                          for _ in range(rng.randint(*MADE_UP_SYLLABLES)))
        words[index] = word.replace(core, made_up.capitalize() if core[0].isupper() else made_up, 1)
    return " ".join(words)


@functools.cache
def _scramble_lexicon() -> list[str]:
    return sorted(filler_lexicon())


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")
