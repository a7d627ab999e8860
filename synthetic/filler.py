"""A deterministic synthetic English-like corpus: plain language-modelling text with no facts to learn.

There is no dataset download on this project's machines, so the filler text that keeps the model a
language model is generated: short paragraphs about the weather, towns, everyday objects, daily
routines and simple stories, from sentence templates whose slots are filled from small word lists.
Each paragraph keeps one subject (a town, an object, a character) throughout, so it reads as a text
rather than a list of random sentences. The same `random.Random` state always gives the same text.
"""

import random
import re
import string
from collections.abc import Iterator

from documents.model import Document

SOURCE = "filler"

WORDS: dict[str, tuple[str, ...]] = {
    "weather_adj": ("cold", "warm", "windy", "cloudy", "bright", "grey", "humid", "foggy", "mild", "stormy",
                    "chilly", "sunny", "damp", "calm", "hot"),
    "precipitation": ("rain", "snow", "hail", "drizzle", "sleet", "mist"),
    "sky": ("clear", "heavy with clouds", "pale blue", "dark", "orange at the edges", "full of stars"),
    "wind": ("a light breeze", "a strong wind", "a gust from the sea", "a soft wind", "a sharp wind"),
    "season": ("spring", "summer", "autumn", "winter"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("morning", "afternoon", "evening"),
    "town_adj": ("quiet", "busy", "small", "old", "crowded", "peaceful", "sleepy", "lively", "narrow",
                 "hilly", "windswept", "tidy"),
    "place": ("market", "harbour", "library", "bakery", "railway station", "town square", "bridge",
              "school", "park", "church", "post office", "river bank", "bus stop", "museum", "garden",
              "workshop", "hospital", "cafe", "theatre", "farm"),
    "building": ("houses", "shops", "towers", "cottages", "warehouses", "chapels", "mills", "barns"),
    "material": ("wood", "stone", "brick", "glass", "iron", "clay", "copper", "wool", "paper", "steel"),
    "color": ("red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple"),
    "size": ("small", "large", "tiny", "heavy", "light", "long", "short", "wide", "round", "flat"),
    "object": ("lamp", "kettle", "chair", "basket", "clock", "bicycle", "umbrella", "teapot", "bucket",
               "ladder", "blanket", "mirror", "hammer", "notebook", "bowl", "suitcase", "radio", "candle",
               "wheelbarrow", "spoon", "jar", "rope", "shelf", "table"),
    "condition": ("old", "new", "worn", "polished", "broken", "dusty", "clean", "scratched", "shiny",
                  "faded"),
    "use": ("carry water", "keep the room warm", "tell the time", "store flour", "fix the fence",
            "read at night", "hold the flowers", "cross the stream", "dry the clothes", "cut the bread"),
    "role": ("baker", "fisherman", "teacher", "farmer", "tailor", "carpenter", "nurse", "painter",
             "shepherd", "gardener", "miller", "sailor", "shopkeeper", "postman", "weaver", "potter",
             "doctor", "musician", "builder", "cook"),
    "animal": ("fox", "cat", "dog", "goat", "owl", "rabbit", "horse", "crow", "mouse", "duck", "bear",
               "sheep", "deer", "hen", "frog", "donkey"),
    "character_adj": ("young", "old", "curious", "tired", "cheerful", "clever", "shy", "brave", "patient",
                      "careful", "lonely", "kind", "grumpy", "busy"),
    "food": ("bread", "soup", "apples", "cheese", "rice", "fish", "pears", "honey", "eggs", "beans",
             "porridge", "plums", "cake", "potatoes"),
    "drink": ("tea", "coffee", "milk", "water", "cider", "lemonade"),
    "chore": ("swept the floor", "mended a coat", "fed the animals", "washed the dishes",
              "painted the gate", "chopped wood", "cleaned the windows", "watered the plants",
              "counted the coins", "folded the laundry", "repaired the roof", "baked a pie"),
    "activity": ("walked to the market", "sat by the window", "read an old book", "sang a song",
                 "wrote a letter", "visited a neighbour", "went fishing", "played cards", "took a nap",
                 "climbed the hill", "listened to the radio", "planted seeds"),
    "feeling": ("happy", "worried", "surprised", "calm", "proud", "sad", "relieved", "excited", "sleepy",
                "grateful"),
    "event": ("a storm broke the old fence", "a stranger knocked at the door", "the river rose high",
              "a letter arrived from far away", "the bell in the tower stopped ringing",
              "a lost puppy followed them home", "the lights went out in the evening",
              "a wheel came off the cart", "the first snow fell", "a festival filled the streets"),
    "ending": ("everyone slept well that night", "the town was quiet again", "they laughed for years",
               "the fence was mended by spring", "they became good friends", "nobody forgot that day",
               "the bell rang once more", "life went on as before"),
    "number": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty"),
    "direction": ("north", "south", "east", "west"),
    "landscape": ("hills", "fields", "woods", "cliffs", "marshes", "meadows", "lakes", "orchards"),
    "town_name": ("Ashford", "Brookmere", "Coldwater", "Dunmore", "Elmstead", "Fairhaven", "Greystone",
                  "Hollowell", "Ivybridge", "Kingsmoor", "Larkfield", "Millbrook", "Northwick", "Oakhurst",
                  "Pinecrest", "Redcliff", "Stonebury", "Thornfield", "Westmarsh", "Willowby"),
}

TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # topic: (opening sentences, body sentences in story order); {subject} is fixed for the whole paragraph.
    "weather": (
        ("The weather on {day} was {weather_adj}.", "It was a {weather_adj} {time} in {season}.",
         "The {subject} woke to a {weather_adj} sky."),
        ("By the {time} the sky was {sky}.", "There was {wind} from the {direction}.",
         "A little {precipitation} fell over the {landscape}.",
         "People at the {place} talked about the {precipitation}.",
         "The forecast promised {precipitation} for {day}.",
         "It felt {weather_adj}, as it often does in {season}.",
         "The {subject} said the {precipitation} would stop before {time}.",
         "The roads were {weather_adj} and empty.", "Children waited for the {precipitation} to end.",
         "Clouds drifted {direction} over the {landscape}."),
    ),
    "town": (
        ("The town of {subject} is {town_adj} and {town_adj}.", "{subject} lies among the {landscape}.",
         "Few visitors know the {town_adj} town of {subject}."),
        ("Its {building} are made of {material}.", "The {place} opens early every {day}.",
         "Near the {place} there are {number} {building}.", "People in {subject} walk to the {place}.",
         "In {season} the streets of {subject} are {town_adj}.",
         "A road leads {direction} to the {landscape}.",
         "The {role} keeps a shop next to the {place}.", "Every {day} there is a fair at the {place}.",
         "The oldest {building} stand by the {place}.", "{subject} is known for its {food}."),
    ),
    "object": (
        ("This is a {size} {subject} made of {material}.", "The {subject} on the shelf is {color}.",
         "There was a {condition} {subject} in the kitchen."),
        ("It is used to {use}.", "The {subject} is {condition} but still useful.",
         "The {role} bought the {subject} at the {place}.", "Its handle is made of {material}.",
         "The {subject} weighs about as much as {number} apples.", "Nobody remembers who painted it {color}.",
         "Next to the {subject} stands a {size} {object}.", "It has been in the family for {number} years.",
         "On {day} the {subject} was cleaned and polished.", "The {subject} is {size} and {color}."),
    ),
    "routine": (
        ("Every {time} the {subject} {chore}.", "The {subject} starts each day with {drink}.",
         "On {day} the {subject} is always busy."),
        ("After that, the {subject} {activity}.", "Lunch was {food} and {food}.",
         "In the {time} the {subject} {chore}.", "Then the {subject} {activity}.",
         "A cup of {drink} waited on the table.", "The {subject} went to the {place} to buy {food}.",
         "Later the {subject} {chore}.", "The {subject} talked with the {role} about the weather.",
         "The {subject} felt {feeling} by the end of the day."),
    ),
    "story": (
        ("Once there was a {character_adj} {subject} who lived near the {place}.",
         "Long ago, a {character_adj} {subject} lived among the {landscape}.",
         "A {character_adj} {subject} once walked to the {place} on a {weather_adj} {time}."),
        ("Every {time}, the {subject} {activity}.", "One day, {event}.", "The {subject} felt {feeling}.",
         "A {character_adj} {animal} came to help.", "Together they went to the {place}.",
         "The {subject} shared some {food} with the {animal}.", "Soon {event}.",
         "The {subject} was {feeling} but did not give up.", "The {role} told the {subject} what to do.",
         "In the end, {ending}."),
    ),
}

# topic -> the word list its paragraph's {subject} comes from
SUBJECTS: dict[str, str] = {
    "weather": "role", "town": "town_name", "object": "object", "routine": "role", "story": "animal",
}

_SLOT = re.compile(r"{(\w+)}")


def filler_paragraph(rng: random.Random, min_sentences: int = 4, max_sentences: int = 9) -> str:
    """One paragraph on a random topic: an opening, then body sentences about the same subject, in order."""
    topic = rng.choice(tuple(TEMPLATES))
    openings, bodies = TEMPLATES[topic]
    subject = rng.choice(WORDS[SUBJECTS[topic]])
    body_count = rng.randint(min_sentences, max_sentences) - 1
    body_indices = sorted(rng.sample(range(len(bodies)), min(body_count, len(bodies))))
    chosen = [rng.choice(openings)] + [bodies[i] for i in body_indices]
    return " ".join(_fill(template, subject, rng) for template in chosen)


def filler_document(rng: random.Random, doc_id: str) -> Document:
    """A filler paragraph as a document (docs/design.md format, source "filler", no probes)."""
    return Document(doc_id=doc_id, text=filler_paragraph(rng), source=SOURCE)


def filler_documents(n: int, split: str = "train", seed: int = 0) -> Iterator[Document]:
    """n filler documents, doc_ids "filler-<split>-s<seed>-<index>"; each split has its own text stream."""
    rng = random.Random(f"ckl-filler:{split}:{seed}")
    for index in range(n):
        yield filler_document(rng, f"{SOURCE}-{split}-s{seed}-{index:07d}")


def lexicon() -> set[str]:
    """Every word the filler corpus can produce, lower-cased (used to keep generated names out of it)."""
    texts = [w for pool in WORDS.values() for w in pool]
    texts += [t for openings, bodies in TEMPLATES.values() for t in openings + bodies]
    return {word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", _SLOT.sub(" ", text))}


def _fill(template: str, subject: str, rng: random.Random) -> str:
    def replace(match: re.Match) -> str:
        return subject if match.group(1) == "subject" else rng.choice(WORDS[match.group(1)])

    sentence = _SLOT.sub(replace, template)
    return sentence[0].upper() + sentence[1:] if sentence[0] in string.ascii_lowercase else sentence
