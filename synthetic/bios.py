"""Fictional biographies with probes: the knowledge stream the default model learns to store and recall.

After Allen-Zhu & Li, "Physics of Language Models: Part 3.1" (bioS): each person has a unique full name
and five attributes — birth date, birth city, university, major, employer. A biography states every
attribute in one sentence, drawn from several templates per attribute, in an order shuffled per
rendering, with the full name in every sentence (the paper's "permute" and "fullname" augmentations,
which it found necessary for the knowledge to be extractable). Each attribute has one probe question
whose answer (1-3 words) appears verbatim in the biography.

Splits. Names come from a fixed syllable generator (independent of the seed) and are split once into
training names and held-out names: the "heldout" split's people have a held-out first AND last name,
so neither their names nor the people themselves ever occur in "train" text, for any seed. The
attribute value pools (cities, universities, majors, employers, dates) are SHARED between the splits:
answers are words the model can learn; what it cannot know in advance is which person has which.

Everything is deterministic: the same seed gives the same people, and the same `random.Random` state
gives the same biography text. People drawn with one seed are a prefix of a longer draw with that seed.
"""

import datetime
import functools
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from documents.model import Document, Probe
from synthetic.filler import lexicon as filler_lexicon

SOURCE = "bios"
SPLITS = ("train", "heldout")
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer")

CITIES = (
    "Lisbon", "Porto", "Madrid", "Seville", "Valencia", "Barcelona", "Paris", "Lyon", "Marseille", "Bordeaux",
    "Brussels", "Antwerp", "Amsterdam", "Rotterdam", "Utrecht", "Berlin", "Hamburg", "Munich", "Cologne",
    "Leipzig", "Dresden", "Vienna", "Salzburg", "Zurich", "Geneva", "Basel", "Milan", "Turin", "Rome",
    "Naples", "Florence", "Venice", "Bologna", "Palermo", "Athens", "Thessaloniki", "Sofia", "Bucharest",
    "Belgrade", "Zagreb", "Budapest", "Prague", "Warsaw", "Krakow", "Gdansk", "Vilnius", "Riga", "Tallinn",
    "Helsinki", "Stockholm", "Oslo", "Bergen", "Copenhagen", "Dublin", "Cork", "London", "Manchester",
    "Liverpool", "Leeds", "Glasgow", "Edinburgh", "Cardiff", "Bristol", "Reykjavik", "Istanbul", "Ankara",
    "Cairo", "Alexandria", "Casablanca", "Tunis", "Algiers", "Lagos", "Accra", "Nairobi", "Mombasa",
    "Kampala", "Addis Ababa", "Dakar", "Johannesburg", "Cape Town", "Durban", "Luanda", "Kinshasa",
    "Tehran", "Baghdad", "Riyadh", "Dubai", "Doha", "Karachi", "Lahore", "Mumbai", "Delhi", "Chennai",
    "Kolkata", "Bangalore", "Hyderabad", "Dhaka", "Colombo", "Kathmandu", "Bangkok", "Hanoi", "Manila",
    "Jakarta", "Singapore", "Kuala Lumpur", "Seoul", "Busan", "Tokyo", "Osaka", "Kyoto", "Sapporo",
    "Beijing", "Shanghai", "Shenzhen", "Chengdu", "Wuhan", "Taipei", "Sydney", "Melbourne", "Brisbane",
    "Perth", "Adelaide", "Auckland", "Wellington", "Vancouver", "Toronto", "Montreal", "Calgary", "Ottawa",
    "Seattle", "Portland", "San Francisco", "Los Angeles", "San Diego", "Denver", "Phoenix", "Dallas",
    "Houston", "Austin", "Chicago", "Detroit", "Boston", "New York", "Philadelphia", "Atlanta", "Miami",
    "New Orleans", "Havana", "Mexico City", "Guadalajara", "Bogota", "Lima", "Quito", "Santiago",
    "Buenos Aires", "Montevideo", "Sao Paulo", "Rio de Janeiro", "Caracas",
)

UNIVERSITIES = (
    "Harvard University", "Stanford University", "Yale University", "Princeton University",
    "Columbia University", "Cornell University", "Brown University", "Duke University",
    "Rice University", "Emory University", "Tufts University", "Boston University",
    "Georgetown University", "Northwestern University", "Vanderbilt University", "Purdue University",
    "University of Chicago", "University of Michigan", "University of Washington", "University of Texas",
    "University of Toronto", "McGill University", "University of Oxford", "University of Cambridge",
    "Imperial College", "University of Edinburgh", "University of Manchester", "Trinity College",
    "Sorbonne University", "ETH Zurich", "EPFL", "Heidelberg University", "University of Vienna",
    "Leiden University", "Utrecht University", "KU Leuven", "University of Copenhagen",
    "Uppsala University", "University of Helsinki", "University of Oslo", "University of Bologna",
    "Sapienza University", "University of Barcelona", "University of Lisbon", "Charles University",
    "Jagiellonian University", "University of Warsaw", "University of Athens", "Tel Aviv University",
    "University of Tokyo", "Kyoto University", "Osaka University", "Seoul National University", "KAIST",
    "Tsinghua University", "Peking University", "Fudan University", "Zhejiang University",
    "National Taiwan University", "University of Melbourne", "University of Sydney", "Monash University",
    "University of Auckland", "University of Nairobi", "Cairo University", "University of Lagos",
    "University of Chile", "Stellenbosch University",
)

MAJORS = (
    "Computer Science", "Mathematics", "Physics", "Chemistry", "Biology", "Economics", "History",
    "Philosophy", "Psychology", "Sociology", "Linguistics", "Architecture", "Civil Engineering",
    "Mechanical Engineering", "Electrical Engineering", "Chemical Engineering", "Aerospace Engineering",
    "Statistics", "Geology", "Astronomy", "Medicine", "Nursing", "Pharmacy", "Law", "Political Science",
    "Anthropology", "Music", "Fine Arts", "Film Studies", "Journalism", "Marketing", "Accounting",
    "Finance", "Business Administration", "Education", "Marine Biology", "Neuroscience", "Ecology",
    "Agriculture", "Nutrition", "Urban Planning", "Graphic Design", "Theatre", "Classics",
    "Comparative Literature", "English Literature", "Materials Science", "Environmental Science",
    "Public Health", "Data Science",
)

EMPLOYERS = (
    "Google", "Microsoft", "Apple", "Amazon", "Intel", "IBM", "Oracle", "Cisco", "Adobe", "Nvidia",
    "Samsung", "Sony", "Panasonic", "Toyota", "Honda", "Nissan", "Hyundai", "Siemens", "Bosch", "BMW",
    "Volkswagen", "Mercedes-Benz", "Airbus", "Boeing", "Lockheed Martin", "General Electric", "Philips",
    "Nokia", "Ericsson", "SAP", "Unilever", "Nestle", "Danone", "PepsiCo", "Coca-Cola", "Procter & Gamble",
    "Johnson & Johnson", "Pfizer", "Novartis", "Roche", "Bayer", "Sanofi", "AstraZeneca", "Merck",
    "Shell", "BP", "TotalEnergies", "Chevron", "ExxonMobil", "Goldman Sachs", "Morgan Stanley",
    "JPMorgan Chase", "Deutsche Bank", "HSBC", "Barclays", "UBS", "Visa", "Mastercard", "PayPal",
    "Netflix", "Spotify", "Uber", "Airbnb", "IKEA", "Zara", "Nike", "Adidas", "Lego", "Canon", "Nintendo",
    "Alibaba", "Tencent", "Huawei", "Lenovo", "Infosys", "Tata Motors", "Walmart", "Target", "Costco",
    "FedEx", "Maersk", "Deloitte", "Accenture", "McKinsey", "Reuters",
)

FIRST_BIRTH_DATE = datetime.date(1940, 1, 1)
LAST_BIRTH_DATE = datetime.date(2004, 12, 31)

SENTENCE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value}.",
        "{name} came into the world on {value}.",
        "The birth date of {name} is {value}.",
        "The records show that {name} was born on {value}.",
        "{name} was born on {value}, a day the family still remembers.",
        "{name}'s life began on {value}.",
    ),
    "birth_city": (
        "{name} was born in {value}.",
        "{name} is a native of {value}.",
        "The birthplace of {name} is {value}.",
        "{name} was born and raised in {value}.",
        "{name} spent an early childhood in {value}, the city of birth.",
        "{name} first saw the light of day in {value}.",
    ),
    "university": (
        "{name} studied at {value}.",
        "{name} graduated from {value}.",
        "{name} received an education at {value}.",
        "{name} attended {value}.",
        "{name} earned a degree from {value}.",
        "For university, {name} chose {value}.",
    ),
    "major": (
        "{name} majored in {value}.",
        "{name} completed a degree in {value}.",
        "{name} focused on {value} at university.",
        "The field of study of {name} was {value}.",
        "{name} chose {value} as a major.",
        "{name} spent the student years learning {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "{name} is employed by {value}.",
        "{name} has a job at {value}.",
        "{name} built a career at {value}.",
        "{name} joined {value} after graduating.",
        "The employer of {name} is {value}.",
    ),
}

QUESTION_TEMPLATES: dict[str, str] = {
    "birth_date": "What is the birth date of {name}?",
    "birth_city": "What is the birth city of {name}?",
    "university": "Which university did {name} attend?",
    "major": "What major did {name} study?",
    "employer": "Which company does {name} work for?",
}

# The name generator: fixed, so the train/held-out name split never depends on a run's seed.
_NAME_SEED = "ckl-bios-names-v1"
FIRST_NAME_COUNT = 2000
LAST_NAME_COUNT = 4000
HELDOUT_NAME_FRACTION = 0.2
_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p", "r",
           "s", "sh", "st", "t", "th", "tr", "v", "w", "z", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "a", "ai", "ea", "ia", "io", "ou", "y")
_FIRST_ENDINGS = ("", "", "", "n", "l", "r", "s", "na", "ra", "lyn", "ric", "mir", "tha", "da", "el", "iel",
                  "an", "ette", "o")
_LAST_ENDINGS = ("son", "sen", "ez", "ova", "ski", "er", "ton", "ley", "wood", "berg", "ard", "ani", "elli",
                 "ov", "mann", "ford", "stein", "ic", "ay", "ens", "", "")


@dataclass(frozen=True)
class Person:
    """A fictional person: a unique full name and the five attributes its biography states."""

    first_name: str
    last_name: str
    born: datetime.date
    birth_city: str
    university: str
    major: str
    employer: str

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    @property
    def birth_date(self) -> str:
        """The birth date as biographies and answers write it: "March 3, 1970"."""
        return f"{self.born:%B} {self.born.day}, {self.born.year}"

    def attribute(self, name: str) -> str:
        """The value of one of ATTRIBUTES."""
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r} (one of {', '.join(ATTRIBUTES)})")
        return getattr(self, name)


def attribute_of(value: str) -> str | None:
    """Which attribute an answer is a value of (None for a value of no pool): for error analysis."""
    if re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", value):
        return "birth_date"
    pools = {"birth_city": CITIES, "university": UNIVERSITIES, "major": MAJORS, "employer": EMPLOYERS}
    return next((attribute for attribute, pool in pools.items() if value in pool), None)


def name_pools(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(first names, last names) of a split; the two splits' name sets are disjoint."""
    _check_split(split)
    first, last = _all_names()
    first_cut = round(len(first) * HELDOUT_NAME_FRACTION)
    last_cut = round(len(last) * HELDOUT_NAME_FRACTION)
    if split == "heldout":
        return first[:first_cut], last[:last_cut]
    return first[first_cut:], last[last_cut:]


def generate_people(n: int, split: str = "train", seed: int = 0) -> list[Person]:
    """n people with distinct full names from the split's name pools, attributes drawn uniformly.

    Deterministic in (split, seed), and `generate_people(k, ...)` is a prefix of `generate_people(n, ...)`
    for k < n. Different seeds may reuse a full name with other attributes: use one seed per corpus.
    """
    first_names, last_names = name_pools(split)
    capacity = len(first_names) * len(last_names)
    if not 0 <= n <= capacity // 2:
        raise ValueError(f"n must be between 0 and {capacity // 2} for split {split!r}, got {n}")

    def draw_name(rng: random.Random) -> tuple[str, str]:
        return first_names[rng.randrange(len(first_names))], last_names[rng.randrange(len(last_names))]

    return draw_people(n, draw_name, random.Random(f"ckl-bios-people:{split}:{seed}"))


def draw_people(n: int, draw_name: Callable[[random.Random], tuple[str, str]], rng: random.Random
                ) -> list[Person]:
    """n people with distinct (first, last) names from `draw_name`, attributes drawn uniformly from `rng`."""
    taken: set[tuple[str, str]] = set()
    people = []
    while len(people) < n:
        name = draw_name(rng)
        if name in taken:
            continue
        taken.add(name)
        people.append(
            Person(
                first_name=name[0],
                last_name=name[1],
                born=_random_date(rng),
                birth_city=rng.choice(CITIES),
                university=rng.choice(UNIVERSITIES),
                major=rng.choice(MAJORS),
                employer=rng.choice(EMPLOYERS),
            )
        )
    return people


def biography(person: Person, rng: random.Random) -> str:
    """One rendering of the person's biography: every attribute once, shuffled order, random templates."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return " ".join(
        rng.choice(SENTENCE_TEMPLATES[attr]).format(name=person.full_name, value=person.attribute(attr))
        for attr in order
    )


def probes(person: Person) -> tuple[Probe, ...]:
    """One question per attribute, in ATTRIBUTES order; each answer appears verbatim in any biography."""
    return tuple(
        Probe(question=QUESTION_TEMPLATES[attribute].format(name=person.full_name),
              answer=person.attribute(attribute))
        for attribute in ATTRIBUTES
    )


def bio_document(person: Person, rng: random.Random, doc_id: str) -> Document:
    """The person's biography as a document (docs/design.md format, source "bios") carrying its probes."""
    return Document(doc_id=doc_id, text=biography(person, rng), source=SOURCE, probes=probes(person))


def bio_documents(n: int, split: str = "train", seed: int = 0) -> Iterator[Document]:
    """The split's first n people as documents, with doc_ids "bios-<split>-s<seed>-<index>"; deterministic."""
    rng = random.Random(f"ckl-bios-text:{split}:{seed}")
    for index, person in enumerate(generate_people(n, split, seed)):
        yield bio_document(person, rng, f"{SOURCE}-{split}-s{seed}-{index:07d}")


def _random_date(rng: random.Random) -> datetime.date:
    span = (LAST_BIRTH_DATE - FIRST_BIRTH_DATE).days
    return FIRST_BIRTH_DATE + datetime.timedelta(days=rng.randint(0, span))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (one of {', '.join(SPLITS)})")


@functools.cache
def _all_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """All generated first and last names, shuffled once; no name is an ordinary word of the corpus."""
    rng = random.Random(_NAME_SEED)
    reserved = filler_lexicon() | _template_words()
    first = _distinct_names(rng, FIRST_NAME_COUNT, _FIRST_ENDINGS, (2, 3), reserved)
    last = _distinct_names(rng, LAST_NAME_COUNT, _LAST_ENDINGS, (2, 3), reserved | {n.lower() for n in first})
    return first, last


def _distinct_names(rng: random.Random, count: int, endings: tuple[str, ...], syllables: tuple[int, int],
                    reserved: set[str]) -> tuple[str, ...]:
    names: dict[str, None] = {}  # insertion-ordered set
    while len(names) < count:
        # only the first syllable may start with a vowel (_ONSETS ends with the empty onset)
        later_onsets = [rng.choice(_ONSETS[:-1]) for _ in range(rng.randint(*syllables) - 1)]
        onsets = [rng.choice(_ONSETS)] + later_onsets
        name = "".join(onset + rng.choice(_VOWELS) for onset in onsets) + rng.choice(endings)
        pronounceable = not re.search(r"(.)\1\1|[aeiouy]{3}|[^aeiouy]{4}", name)
        if 4 <= len(name) <= 11 and pronounceable and name not in reserved:
            names[name] = None
    return tuple(name.capitalize() for name in names)


def _template_words() -> set[str]:
    """Lower-cased words of every template and attribute value."""
    texts = [t for templates in SENTENCE_TEMPLATES.values() for t in templates]
    texts += list(QUESTION_TEMPLATES.values()) + list(CITIES + UNIVERSITIES + MAJORS + EMPLOYERS)
    texts += [datetime.date(2000, month, 1).strftime("%B") for month in range(1, 13)]
    return {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", text)}
