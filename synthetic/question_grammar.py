"""Question phrasings built from parts, for training: frames that every attribute shares, filled with the
words that name each attribute ("What is X's {noun}?" with "birthplace", "alma mater", "employer", ...),
and verb frames whose words overlap across attributes ("Where was X born?", "Where did X study?", "Where
does X work?"). A model asked these cannot tell the attribute by a frame it learned for one attribute;
it has to read the words that name it, which is what questions in unseen phrasings need.

Training text only: a built phrasing within one word of any held-out question phrasing
(synthetic/rich_bios.py) is left out, so the held-out phrasings stay unseen.
"""

import functools
import itertools

from synthetic import rich_bios

NOUN_FRAMES = (
    "What is {name}'s {noun}?",
    "What was {name}'s {noun}?",
    "Tell me {name}'s {noun}.",
    "Do you know {name}'s {noun}?",
    "What is the {noun} of {name}?",
    "Which {noun} does {name} have?",
    "Name {name}'s {noun}.",
    "What {noun} is on record for {name}?",
    "Could you give me {name}'s {noun}?",
    "And {name}'s {noun}?",
    "I would like to know {name}'s {noun}.",
    "What does {name} list as the {noun}?",
    "Please state the {noun} of {name}.",
    "Any idea what {name}'s {noun} is?",
)
NOUNS = {
    "birth_date": ("birth date", "date of birth", "birthday with the year", "day of birth",
                   "full birth date"),
    "birth_city": ("birth city", "city of birth", "birthplace", "home town", "native city", "place of birth"),
    "university": ("university", "alma mater", "college", "old university", "university of graduation"),
    "major": ("major", "subject", "field of study", "degree subject", "academic field", "discipline"),
    "employer": ("employer", "company", "firm", "workplace", "current employer", "place of work"),
}
VERB_FRAMES = {
    "birth_date": ("When was {name} born?", "When did {name} get born?", "On which date was {name} born?",
                   "When is {name} from, to the day?", "What was the day {name} was born?"),
    "birth_city": ("Where was {name} born?", "Where is {name} from?", "Where did {name} grow up as a baby?",
                   "In what city was {name} born?", "Where was {name} born and registered?"),
    "university": ("Where did {name} study?", "Where did {name} go to university?",
                   "At which university did {name} study?", "Where did {name} get a degree?",
                   "Which university did {name} graduate from?"),
    "major": ("What did {name} study?", "What did {name} major in?", "What did {name} get a degree in?",
              "In which subject did {name} graduate?", "What did {name} study at university?"),
    "employer": ("Where does {name} work?", "Who does {name} work for?", "Where is {name} working now?",
                 "For whom does {name} work?", "Which company did {name} go to work for?"),
}


@functools.cache
def built_questions(attribute: str) -> tuple[str, ...]:
    """The attribute's built phrasings ("{name}" to fill), none within one word of a held-out phrasing."""
    held = [_words(t) for templates in rich_bios.wording_of("heldout-wording").questions.values()
            for t in templates]
    built = [frame.replace("{noun}", noun)
             for frame, noun in itertools.product(NOUN_FRAMES, NOUNS[attribute])]
    return tuple(q for q in dict.fromkeys(built + list(VERB_FRAMES[attribute]))
                 if all(len(_words(q) ^ h) > 2 for h in held))


def _words(question: str) -> set[str]:
    """A question's lowercase words, "'s" apart, punctuation dropped."""
    return set(question.lower().replace("?", " ").replace(".", " ").replace("'s", " 's").split())
