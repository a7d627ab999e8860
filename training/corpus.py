"""The default model's training data: the training split of the synthetic biographies and filler text,
in the shape the recipe (training/recipe.py) draws from.

Two streams, chosen by `TrainConfig.corpus`: "bios" (synthetic/bios.py, six templates per attribute, the
committed model's) and "rich" (synthetic/rich_bios.py: free wording, ordinary names, held-out wording).
"""

import random

from synthetic import bios, filler, rich_bios
from synthetic.question_grammar import built_questions
from training.recipe import TrainConfig

TRAIN_PEOPLE = 50_000
# Training-only questions about a birth date's parts: they make months and numbers worth copying.
DATE_PART_QUESTIONS = (
    ("In which month was {name} born?", lambda born: f"{born:%B}"),
    ("On which day of the month was {name} born?", lambda born: str(born.day)),
    ("In which year was {name} born?", lambda born: str(born.year)),
)


class BiosCorpus:
    """Training biographies (fresh rendering per draw) and filler paragraphs."""

    def __init__(self, seed: int, people: int = TRAIN_PEOPLE):
        self.people = bios.generate_people(people, "train", seed)

    def document(self, rng: random.Random, plain: bool = False, value_first: float = 0.0, built: float = 0.0
                 ) -> tuple[str, list[tuple[str, str]]]:
        person = rng.choice(self.people)  # one question per attribute, no plain form: the rest do not apply
        return bios.biography(person, rng), [(p.question, p.answer) for p in bios.probes(person)]

    def filler(self, rng: random.Random) -> str:
        return filler.filler_paragraph(rng)


class RichBiosCorpus:
    """Training biographies of the rich stream, asked in training phrasings (plus, optionally, the parts
    of the birth date); `scramble_share` of the attribute sentences of a full rendering are scrambled.
    A plain document is a plain rendering asked in plain questions (synthetic/rich_bios.py), its values
    stated first with chance `value_first`. Any other has its words made up with chance `word_noise`, and
    each question is, with chance `built`, a phrasing of synthetic/question_grammar.py instead."""

    def __init__(self, seed: int, people: int = TRAIN_PEOPLE, scramble_share: float = 0.0,
                 date_parts: bool = False, word_noise: float = 0.0):
        self.people = rich_bios.generate_people(people, "train", seed)
        self.scramble_share, self.date_parts, self.word_noise = scramble_share, date_parts, word_noise

    def document(self, rng: random.Random, plain: bool = False, value_first: float = 0.0, built: float = 0.0
                 ) -> tuple[str, list[tuple[str, str]]]:
        person = rng.choice(self.people)
        text = rich_bios.biography(person, rng, "train", plain=plain, scramble_share=self.scramble_share,
                                   word_noise=self.word_noise, value_first_share=value_first)
        qas = [(p.question, p.answer) for p in rich_bios.probes(person, rng, "train", plain, self.word_noise)]
        if built and not plain:
            qas = [(self._built_question(a, person, rng) if rng.random() < built else question, answer)
                   for (question, answer), a in zip(qas, bios.ATTRIBUTES, strict=True)]
        if self.date_parts:
            qas += [(question.format(name=person.full_name), answer(person.born))
                    for question, answer in DATE_PART_QUESTIONS]
        return text, qas

    def filler(self, rng: random.Random) -> str:
        return filler.filler_paragraph(rng)

    def _built_question(self, attribute: str, person: bios.Person, rng: random.Random) -> str:
        phrasing = rich_bios.noised(rng.choice(built_questions(attribute)), self.word_noise, rng)
        return phrasing.format(name=person.full_name)


def build_corpus(config: TrainConfig, people: int = TRAIN_PEOPLE) -> BiosCorpus | RichBiosCorpus:
    """The corpus a config names."""
    if config.corpus == "bios":
        return BiosCorpus(config.seed, people)
    return RichBiosCorpus(config.seed, people, config.scramble_share, config.date_part_questions,
                          config.word_noise)
