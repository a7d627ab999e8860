"""The free-wording biographies (synthetic/rich_bios.py): determinism, answers in the text, and held-out
wording and names that never occur in training text."""

import random
import re
import string

import pytest

from synthetic import bios, rich_bios, wording
from synthetic.question_grammar import built_questions


def _template_pattern(template: str) -> re.Pattern:
    """A template as a regex over rendered text: its fields (and a leading person reference, which may be
    a pronoun) match any words within one sentence."""
    body = re.sub(r"^\{name\}('s)? ", "", template)
    parts = []
    for literal, field, _, _ in string.Formatter().parse(body):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"[^.]+?")
    return re.compile("".join(parts))


def _training_texts(n: int = 1500) -> list[str]:
    rng = random.Random(5)
    people = rich_bios.generate_people(n, "train", seed=5)
    texts = [rich_bios.biography(p, rng, "train", scramble_share=0.3) for p in people]
    texts += [rich_bios.biography(p, rng, "train", plain=True) for p in people[:300]]
    return texts


def test_documents_are_deterministic_and_people_a_prefix():
    first = list(rich_bios.bio_documents(40, "heldout-wording", seed=2))
    assert first == list(rich_bios.bio_documents(40, "heldout-wording", seed=2))
    assert first != list(rich_bios.bio_documents(40, "heldout-wording", seed=3))
    assert rich_bios.generate_people(10, "train", 1) == rich_bios.generate_people(50, "train", 1)[:10]
    same_people = rich_bios.generate_people(30, "heldout-names", 1)
    assert same_people == rich_bios.generate_people(30, "heldout-wording", 1)


@pytest.mark.parametrize("split", rich_bios.SPLITS)
def test_every_answer_occurs_verbatim_in_every_rendering(split):
    rng = random.Random(0)
    for person in rich_bios.generate_people(300, split, seed=0):
        probes = rich_bios.probes(person, rng, split)
        assert [p.answer for p in probes] == [person.attribute(a) for a in bios.ATTRIBUTES]
        for text in (rich_bios.biography(person, rng, split),
                     rich_bios.biography(person, rng, split, plain=True),
                     rich_bios.biography(person, rng, split, scramble_share=1.0)):
            assert all(p.answer in text for p in probes), text
            assert person.full_name in text and "{" not in text and "\0" not in text


def test_a_rendering_varies_references_order_and_extras():
    rng = random.Random(1)
    person = rich_bios.generate_people(1, "train", seed=1)[0]
    texts = [rich_bios.biography(person, rng) for _ in range(200)]
    assert any(re.search(r"\b(She|He|Her|His)\b", t) for t in texts)
    assert any(t.count(person.full_name) == 1 for t in texts)  # later mentions by surname or pronoun
    assert len({t.split(".")[0] for t in texts}) > 50
    plain = rich_bios.biography(person, rng, plain=True)
    assert plain.count(person.full_name) == len(bios.ATTRIBUTES)


def test_a_plain_rendering_names_the_person_before_each_value_and_plain_questions_draw_nothing():
    rng = random.Random(2)
    for person in rich_bios.generate_people(200, "train", seed=2):
        text = rich_bios.biography(person, rng, plain=True)
        before, *sentences = text.split(person.full_name)
        assert before == "" and len(sentences) == len(bios.ATTRIBUTES)
        for sentence in sentences:  # each mention of the name is followed by exactly one value
            assert sum(person.attribute(a) in sentence for a in bios.ATTRIBUTES) == 1, text
        state = rng.getstate()
        questions = [p.question for p in rich_bios.probes(person, rng, plain=True)]
        assert rng.getstate() == state
        assert questions == [rich_bios.wording_of("train").questions[a][0].format(name=person.full_name)
                             for a in bios.ATTRIBUTES]
    assert all(len(rich_bios.names_first(t)) >= 20 for t in rich_bios.wording_of("train").sentences.values())


def test_a_value_first_plain_rendering_states_each_value_before_the_name():
    rng = random.Random(3)
    first_sentence_value_first = 0
    for person in rich_bios.generate_people(200, "train", seed=3):
        values = [person.attribute(a) for a in bios.ATTRIBUTES]
        before, *after = rich_bios.biography(person, rng, plain=True, value_first_share=1.0).split(
            person.full_name)
        assert len(after) == len(bios.ATTRIBUTES)  # still named in full in every sentence
        assert sum(v in before for v in values) == 1 and not any(v in after[-1] for v in values)
        half = rich_bios.biography(person, rng, plain=True, value_first_share=0.5)
        first_sentence_value_first += any(v in half.split(person.full_name)[0] for v in values)
    assert 70 < first_sentence_value_first < 130  # about half of the first sentences, at 0.5


def test_word_noise_makes_up_template_words_only_and_draws_nothing_when_off():
    person = rich_bios.generate_people(1, "train", seed=4)[0]
    rng, unnoised_rng = random.Random(3), random.Random(3)
    for _ in range(50):  # noise 0 renders and asks exactly as without the knob
        assert rich_bios.biography(person, rng, word_noise=0.0) == rich_bios.biography(person, unnoised_rng)
        assert rich_bios.probes(person, rng, word_noise=0.0) == rich_bios.probes(person, unnoised_rng)
    train = rich_bios.wording_of("train")
    known = {word.strip(string.punctuation).lower()
             for words in (*train.sentences.values(), *train.questions.values(), *train.combined.values(),
                           train.side, train.others) for template in words for word in template.split()}
    texts = [rich_bios.biography(person, rng, word_noise=0.5) for _ in range(50)]
    questions = [p.question for _ in range(50) for p in rich_bios.probes(person, rng, word_noise=0.5)]
    for text in texts:  # names and values are never noised
        assert all(person.attribute(a) in text for a in bios.ATTRIBUTES)
    assert all(person.full_name in question for question in questions)
    words = {w.strip(string.punctuation).lower() for t in texts + questions for w in t.split()}
    made_up = {w for w in words - known if re.fullmatch(r"([bdfgklmnprstvz][aeiou]){2,3}", w)}
    assert len(made_up) > 50
    plain_rng = random.Random(4)
    assert rich_bios.biography(person, plain_rng, plain=True, word_noise=0.5) == rich_bios.biography(
        person, random.Random(4), plain=True)


def test_wording_trials_change_one_piece_of_the_reference_each():
    trials = rich_bios.wording_trials(6, seed=3)
    train, held = rich_bios.wording_of("train"), rich_bios.wording_of("heldout-wording")
    for attribute in bios.ATTRIBUTES:
        reference, *tried = [t for t in trials if t.attribute == attribute]
        assert reference.kind == "reference" and reference.wording == train.questions[attribute][0]
        assert [t.wording for t in tried if t.kind == "question"] == list(held.questions[attribute])
        assert [t.wording for t in tried if t.kind == "template"] == list(held.sentences[attribute])
        trained = [t.wording for t in tried if t.kind == "training template"]
        assert trained and set(trained) <= set(train.sentences[attribute])
        assert all(t.index("{value}") < t.index("{name}") for t in trained)
        assert len(trained) == len(train.sentences[attribute]) - len(rich_bios.names_first(
            train.sentences[attribute]))
        people = rich_bios.generate_people(6, "heldout-wording", seed=3)
        assert [p.answer for p in reference.probes] == [person.attribute(attribute) for person in people]
        for trial in tried:
            if trial.kind == "question":  # the same texts; only the question's phrasing differs
                assert trial.texts == reference.texts and not trial.value_first
                assert [p.question for p in trial.probes] == [trial.wording.format(name=p.full_name)
                                                             for p in people]
            else:  # the same question; only the sentence stating the attribute differs
                assert trial.probes == reference.probes
                assert trial.value_first == (trial.wording.index("{value}") < trial.wording.index("{name}"))
                for text, reference_text, person in zip(trial.texts, reference.texts, people, strict=True):
                    stated = trial.wording.format(name=person.full_name, value=person.attribute(attribute))
                    assert stated in text and stated not in reference_text
                    changed = set(text.split(". ")) ^ set(reference_text.split(". "))
                    assert len(changed) == 2, (text, reference_text)
    assert sum(t.value_first for t in trials) >= len(bios.ATTRIBUTES)


def test_heldout_wording_never_occurs_in_training_text():
    texts = _training_texts()
    for template in rich_bios.held_out(
        [t for templates in wording.SENTENCE_TEMPLATES.values() for t in templates]
    ) + rich_bios.held_out(wording.COMBINED_TEMPLATES) + rich_bios.held_out(wording.COLOUR_SENTENCES):
        pattern = _template_pattern(template)
        leaks = [t for t in texts if pattern.search(t)]
        assert not leaks, f"held-out {template!r} occurs in training text: {leaks[0]!r}"


def test_heldout_split_uses_only_heldout_questions_and_names():
    questions = [wording.QUESTION_TEMPLATES[a] for a in bios.ATTRIBUTES]
    heldout_questions = {q for phrasings in questions for q in rich_bios.held_out(phrasings)}
    training_questions = {q for phrasings in questions for q in rich_bios.for_training(phrasings)}
    assert heldout_questions and not heldout_questions & training_questions
    phrasings = [re.compile(re.escape(q).replace(r"\{name\}", ".+") + "$") for q in heldout_questions]
    for document in rich_bios.bio_documents(100, "heldout-wording", seed=4):
        assert all(any(p.match(probe.question) for p in phrasings) for probe in document.probes)
    heldout_names = set(rich_bios.held_out(wording.FIRST_NAMES) + rich_bios.held_out(wording.LAST_NAMES))
    training_words = {w for text in _training_texts(500) for w in re.findall(r"[A-Za-z]+", text)}
    assert not heldout_names & training_words
    people = rich_bios.generate_people(400, "heldout-wording", seed=4)
    assert any(p.first_name in heldout_names for p in people)
    assert any(p.last_name in heldout_names for p in people)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="unknown split"):
        rich_bios.generate_people(1, "heldout")


def test_foreign_wording_set_is_valid_and_its_answers_are_in_the_text():
    """tests/data/foreign_wording_docs.jsonl: written by hand, without the generator's templates, for
    `ckl eval retention --docs`; its values come from the generator's pools."""
    from pathlib import Path

    from documents.parse import parse_document

    lines = (Path(__file__).parent / "data" / "foreign_wording_docs.jsonl").read_bytes().splitlines()
    documents = [parse_document(line) for line in lines]
    probes = [(d, p) for d in documents for p in d.probes]
    assert len(documents) == 40 and len(probes) > 150
    pools = set(bios.CITIES + bios.UNIVERSITIES + bios.MAJORS + bios.EMPLOYERS)
    for document, probe in probes:
        assert probe.answer in document.text
        assert probe.answer in pools or re.fullmatch(r"[A-Z][a-z]+ \d{1,2}, \d{4}", probe.answer)


def test_data_bios_rich_stream_writes_both_heldout_splits(tmp_path):
    import argparse
    import json

    from cli import data as data_cli
    from documents.parse import parse_document

    parser = argparse.ArgumentParser()
    data_cli.add_arguments(parser)
    args = parser.parse_args(["bios", "--out", str(tmp_path), "--stream", "rich", "--train-people", "50",
                              "--heldout-people", "20", "--filler-docs", "10", "--seed", "3"])
    assert data_cli.run(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["stream"] == "rich"
    assert {name: entry["documents"] for name, entry in manifest["files"].items()} == {
        "train.jsonl": 50, "heldout_names.jsonl": 20, "heldout_wording.jsonl": 20,
        "filler_train.jsonl": 10, "filler_heldout.jsonl": 1,
    }
    lines = (tmp_path / "heldout_wording.jsonl").read_bytes().splitlines()
    wording_docs = [parse_document(line) for line in lines]
    assert wording_docs == list(rich_bios.bio_documents(20, "heldout-wording", seed=3))


def test_built_questions_share_frames_across_attributes_and_stay_clear_of_held_out_phrasings():
    held = {q for qs in rich_bios.wording_of("heldout-wording").questions.values() for q in qs}
    built = {a: built_questions(a) for a in bios.ATTRIBUTES}
    assert all(len(questions) >= 60 and "{name}" in questions[0] for questions in built.values())
    assert not held & {q for questions in built.values() for q in questions}
    assert "What is {name}'s university?" not in built["university"]  # one word from a held-out one
    assert "What is {name}'s alma mater?" in built["university"] and "Tell me {name}'s employer." in built[
        "employer"]
    wheres = {a for a, questions in built.items() if any(q.startswith("Where ") for q in questions)}
    assert wheres == {"birth_city", "university", "employer"}  # "where" alone does not tell the attribute
