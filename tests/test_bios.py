"""The biography/filler generator and `ckl data bios`: determinism, split hygiene, probes, schema."""

import argparse
import json
import random
import re

import pytest

from cli import data as data_cli
from documents.parse import parse_document
from synthetic import bios
from synthetic.filler import filler_documents


def _words(texts: list[str]) -> set[str]:
    return {word for text in texts for word in re.findall(r"[A-Za-z]+", text)}


def test_same_seed_gives_same_documents_and_other_seed_differs():
    first = list(bios.bio_documents(50, "train", seed=3))
    assert first == list(bios.bio_documents(50, "train", seed=3))
    assert list(filler_documents(20, "train", seed=3)) == list(filler_documents(20, "train", seed=3))
    other = list(bios.bio_documents(50, "train", seed=4))
    assert [d.text for d in first] != [d.text for d in other]


def test_fewer_people_are_a_prefix_of_more_people():
    assert bios.generate_people(30, "heldout", seed=1) == bios.generate_people(300, "heldout", seed=1)[:30]


def test_full_names_are_unique():
    people = bios.generate_people(20_000, "train", seed=0)
    assert len({p.full_name for p in people}) == len(people)


def test_heldout_names_never_occur_in_training_text():
    train_first, train_last = bios.name_pools("train")
    heldout_first, heldout_last = bios.name_pools("heldout")
    heldout_names = set(heldout_first) | set(heldout_last)
    assert not heldout_names & (set(train_first) | set(train_last))
    training_text = [d.text for d in bios.bio_documents(3000, "train", seed=0)]
    training_text += [d.text for d in filler_documents(1000, "train", seed=0)]
    assert not heldout_names & _words(training_text)


def test_heldout_people_are_not_training_people_for_any_seed():
    train = {p.full_name for seed in (0, 1) for p in bios.generate_people(2000, "train", seed)}
    heldout = bios.generate_people(2000, "heldout", seed=0)
    assert not train & {p.full_name for p in heldout}
    heldout_first, heldout_last = bios.name_pools("heldout")
    assert all(p.first_name in heldout_first and p.last_name in heldout_last for p in heldout)


def test_attribute_values_are_shared_between_splits():
    for attribute, pool in [("birth_city", bios.CITIES), ("employer", bios.EMPLOYERS)]:
        for split in bios.SPLITS:
            values = {p.attribute(attribute) for p in bios.generate_people(3000, split, seed=0)}
            assert values == set(pool), (attribute, split)


@pytest.mark.parametrize("split", bios.SPLITS)
def test_every_probe_answer_is_short_and_appears_in_its_biography(split):
    people = bios.generate_people(500, split, seed=0)
    for person, document in zip(people, bios.bio_documents(500, split, seed=0), strict=True):
        assert [probe.answer for probe in document.probes] == [person.attribute(a) for a in bios.ATTRIBUTES]
        for probe in document.probes:
            assert probe.answer in document.text
            assert 1 <= len(probe.answer.split()) <= 3
            assert person.full_name in probe.question and probe.question.endswith("?")


def test_biographies_shuffle_sentence_order_and_templates():
    person = bios.generate_people(1, "train", seed=0)[0]
    rng = random.Random(0)
    renderings = {bios.biography(person, rng) for _ in range(200)}
    assert len(renderings) > 150
    first_sentences = {text.split(". ")[0] for text in renderings}
    first_attributes = {a for a in bios.ATTRIBUTES for s in first_sentences if person.attribute(a) in s}
    assert first_attributes == set(bios.ATTRIBUTES)
    for text in renderings:
        assert text.count(person.full_name) == len(bios.ATTRIBUTES)


def test_documents_validate_against_the_schema():
    documents = [*bios.bio_documents(100, "heldout", seed=0), *filler_documents(100, "heldout", seed=0)]
    for document in documents:
        assert parse_document(document.to_json().encode("utf-8")) == document
    assert {d.source for d in documents} == {"bios", "filler"}
    assert len({d.doc_id for d in documents}) == len(documents)


def test_filler_is_varied_and_heldout_filler_differs_from_training_filler():
    train = [d.text for d in filler_documents(300, "train", seed=0)]
    heldout = [d.text for d in filler_documents(300, "heldout", seed=0)]
    assert len(set(train)) == len(train)
    assert not set(train) & set(heldout)
    sentences = {s for text in train for s in text.split(". ")}
    assert len(sentences) > 1000
    assert len(_words(train)) > 300


def test_bad_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown split"):
        bios.generate_people(1, "test")
    with pytest.raises(ValueError, match="n must be between"):
        bios.generate_people(10**9, "heldout")
    with pytest.raises(ValueError, match="unknown attribute"):
        bios.generate_people(1)[0].attribute("shoe_size")


def _run_data_bios(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    data_cli.add_arguments(parser)
    return data_cli.run(parser.parse_args(["bios", *argv]))


def test_data_bios_writes_valid_jsonl_and_a_manifest_deterministically(tmp_path):
    args = ["--train-people", "200", "--heldout-people", "30", "--filler-docs", "40", "--seed", "7"]
    assert _run_data_bios("--out", str(tmp_path / "a"), *args) == 0
    assert _run_data_bios("--out", str(tmp_path / "b"), *args) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["attribute_pools_shared_between_splits"] is True
    expected = {"train.jsonl": 200, "heldout.jsonl": 30, "filler_train.jsonl": 40, "filler_heldout.jsonl": 4}
    assert {name: entry["documents"] for name, entry in manifest["files"].items()} == expected
    for name, count in expected.items():
        lines = (tmp_path / "a" / name).read_bytes().splitlines()
        assert len(lines) == count
        documents = [parse_document(line) for line in lines]
        assert all(d.probes for d in documents) == (name in ("train.jsonl", "heldout.jsonl"))
    heldout_names = {p.full_name for p in bios.generate_people(30, "heldout", seed=7)}
    assert not any(name in (tmp_path / "a" / "train.jsonl").read_text() for name in heldout_names)


def test_attribute_of_tells_a_value_by_its_pool():
    person = bios.generate_people(1, "train", seed=0)[0]
    assert [bios.attribute_of(person.attribute(a)) for a in bios.ATTRIBUTES] == list(bios.ATTRIBUTES)
    assert bios.attribute_of("Marine Biology") == "major" and bios.attribute_of("Cairo") == "birth_city"
    assert bios.attribute_of("Cairo University") == "university" and bios.attribute_of("chess") is None
