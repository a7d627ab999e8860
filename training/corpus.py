"""The default model's training data: the training split of the synthetic biographies and filler text,
in the shape the recipe (training/recipe.py) draws from."""

import random

from synthetic import bios, filler

TRAIN_PEOPLE = 50_000


class BiosCorpus:
    """Training biographies (fresh rendering per draw) and filler paragraphs."""

    def __init__(self, seed: int, people: int = TRAIN_PEOPLE):
        self.people = bios.generate_people(people, "train", seed)

    def document(self, rng: random.Random) -> tuple[str, list[tuple[str, str]]]:
        person = rng.choice(self.people)
        return bios.biography(person, rng), [(p.question, p.answer) for p in bios.probes(person)]

    def filler(self, rng: random.Random) -> str:
        return filler.filler_paragraph(rng)
