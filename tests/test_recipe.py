"""Pieces of the training recipe (training/recipe.py, training/corpus.py) that need no training run."""

import dataclasses
import random
from pathlib import Path

import pytest

from model import MemoryLLMConfig
from model.tokenizer import load_tokenizer
from synthetic import bios, rich_bios
from synthetic.question_grammar import built_questions
from training.corpus import RichBiosCorpus
from training.recipe import (
    PRESETS,
    Encoder,
    TrainConfig,
    _check_shape,
    _resume_mismatch,
    built_question_share,
    copy_row,
    cuts_words,
    model_config,
    value_first_share,
)

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "model" / "default"
TEXT = "Lars Mensah was born in Riga on March 3, 1970. She works for Procter & Gamble.\nUnseen: Ümit"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def test_word_piece_dropout_cuts_words_reproducibly_and_keeps_the_text(tokenizer):
    canonical = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert Encoder(tokenizer, 0.2, dropout=0.5).text(TEXT, 1.0)[0] == canonical  # no rng: canonical
    assert Encoder(tokenizer, 0.2, dropout=0.0).text(TEXT, 1.0, random.Random(0))[0] == canonical
    assert Encoder(tokenizer, 0.2, dropout=1e-12).text(TEXT, 1.0, random.Random(0))[0] == canonical
    encoder = Encoder(tokenizer, 0.2, dropout=0.5)
    cut, weights = encoder.text(TEXT, 0.7, random.Random(1))
    assert cut == encoder.text(TEXT, 0.7, random.Random(1))[0]
    assert tokenizer.decode(cut) == TEXT and len(cut) > len(canonical) and weights == [0.7] * len(cut)
    assert cut != encoder.text(TEXT, 0.7, random.Random(2))[0]


def test_copy_row_repeats_ordinary_tokens_and_scores_the_repeat_only():
    ids, weights = copy_row(random.Random(0), 16, 300)
    assert ids[:16] == ids[16:] and all(3 <= i < 300 for i in ids)
    assert weights == [0.0] * 16 + [1.0] * 16


def test_rich_corpus_asks_date_parts_in_training_only():
    corpus = RichBiosCorpus(seed=0, people=50, date_parts=True)
    text, qas = corpus.document(random.Random(0))
    person = next(p for p in corpus.people if p.full_name in qas[0][0])
    assert len(qas) == 8 and all(answer in text for _, answer in qas[:5])
    assert [a for _, a in qas[5:]] == [f"{person.born:%B}", str(person.born.day), str(person.born.year)]
    plain, _ = corpus.document(random.Random(0), plain=True)
    assert plain.count(person.full_name) == 5


def test_a_resume_may_change_stage_lengths_and_stage_b_knobs_before_stage_b_only():
    config = PRESETS["rich"]
    saved = dataclasses.asdict(config)
    longer = dataclasses.replace(config, memory_steps=5000, max_old_age=24, checkpoint_every=50)
    assert _resume_mismatch(saved, longer, step=100) == {}
    assert _resume_mismatch(saved, longer, step=config.reader_steps) == {"max_old_age": (48, 24)}
    assert _resume_mismatch(saved, dataclasses.replace(config, text_dropout=0.2), 100) == {
        "text_dropout": (0.1, 0.2)
    }
    # a run saved before a knob existed resumes when the knob keeps its default
    old = {k: v for k, v in dataclasses.asdict(TrainConfig()).items() if k != "copy_rows"}
    assert _resume_mismatch(old, TrainConfig(), step=10) == {}
    assert "copy_rows" in _resume_mismatch(old, dataclasses.replace(TrainConfig(), copy_rows=2), step=10)
    # a run started with --init-from resumes without it (the checkpoint in --out has the weights)
    started = dataclasses.asdict(dataclasses.replace(config, init_from="/somewhere/model/rich"))
    assert _resume_mismatch(started, config, step=100) == {}


def test_config_refuses_an_unknown_corpus_and_bad_shares():
    with pytest.raises(ValueError, match="corpus"):
        TrainConfig(corpus="wiki")
    with pytest.raises(ValueError, match="text_dropout"):
        TrainConfig(text_dropout=1.0)
    with pytest.raises(ValueError, match="word_noise"):
        TrainConfig(word_noise=-0.1)
    with pytest.raises(ValueError, match="value_first_steps"):
        TrainConfig(plain_steps=100, value_first_steps=200)


def test_the_value_first_phase_is_the_plain_starts_last_steps():
    config = PRESETS["rich-vf"]
    start = config.plain_steps - config.value_first_steps
    shares = [value_first_share(config, step) for step in (0, start - 1, start, config.plain_steps - 1,
                                                           config.plain_steps, config.reader_steps)]
    assert shares == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert not any(value_first_share(PRESETS["rich"], step) for step in range(0, 8000, 50))


def test_word_piece_dropout_starts_after_the_plain_start_and_spares_filler_without_filler_dropout():
    rich, vf = PRESETS["rich"], PRESETS["rich-vf"]
    assert [cuts_words(rich, step, filler=False) for step in (0, rich.plain_steps - 1, rich.plain_steps)] == [
        False, False, True]
    assert cuts_words(rich, rich.plain_steps, filler=True) and cuts_words(rich, rich.total_steps - 1, True)
    assert cuts_words(vf, vf.plain_steps, filler=False)
    assert not any(cuts_words(vf, step, filler=True) for step in (0, vf.plain_steps, vf.total_steps - 1))


def test_built_questions_replace_a_share_of_full_documents_questions_from_their_step():
    vf = PRESETS["rich-vf"]
    assert [built_question_share(vf, s) for s in (0, vf.built_questions_from - 1, vf.built_questions_from,
                                                  vf.total_steps - 1)] == [0.0, 0.0, 0.5, 0.5]
    assert built_question_share(PRESETS["rich"], 5000) == 0.0
    corpus, own = RichBiosCorpus(seed=0, people=50), rich_bios.wording_of("train").questions

    def phrasings(seed: int, **kwargs) -> list[tuple[str, str]]:
        qas = corpus.document(random.Random(seed), **kwargs)[1]
        person = next(p for p in corpus.people if p.full_name in qas[0][0])
        return [(a, q.replace(person.full_name, "{name}"))
                for a, (q, _) in zip(bios.ATTRIBUTES, qas, strict=True)]

    for seed in range(20):
        assert all(q in built_questions(a) for a, q in phrasings(seed, built=1.0))
        assert all(q in own[a] for a, q in phrasings(seed, built=0.0))
        assert all(q == own[a][0] for a, q in phrasings(seed, plain=True, built=1.0))


def test_a_checkpoint_of_the_presets_shape_passes_the_shape_check_and_another_does_not():
    preset = PRESETS["rich"]
    found = MemoryLLMConfig.from_pretrained(DEFAULT_MODEL.parent / "rich")
    _check_shape(found, model_config(preset, found.vocab_size), "model/rich")  # raises on a mismatch
    with pytest.raises(ValueError, match="hidden_size"):
        _check_shape(found, model_config(dataclasses.replace(preset, hidden_size=64), found.vocab_size), "x")
