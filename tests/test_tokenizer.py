"""The project's byte-level BPE tokenizer: any UTF-8 round-trips, specials, vocab size, checkpoint I/O."""

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, load_tokenizer, save_tokenizer, train_tokenizer
from synthetic.bios import bio_documents, generate_people
from synthetic.filler import filler_documents

VOCAB_SIZE = 1024


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [d.text for d in bio_documents(2000, "train", seed=0)] + [
        d.text for d in filler_documents(300, "train", seed=0)
    ]


@pytest.fixture(scope="module")
def tokenizer(corpus) -> PreTrainedTokenizerFast:
    return train_tokenizer(corpus, VOCAB_SIZE)


ARBITRARY_TEXTS = [
    "Grüße aus Köln — naïve café",
    "東京で生まれた。北京大学を卒業した。",
    "emoji 🧬🚀👩🏽‍🔬 and flags 🇵🇹",
    "tabs\tand\nnewlines\r\n  double  spaces ",
    "control \x00\x07 and combining e\u0301",
    "a literal <eos> or <bos> in the text stays text",
    "",
]


@pytest.mark.parametrize("text", ARBITRARY_TEXTS)
def test_any_utf8_text_round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    with_specials = tokenizer(text)["input_ids"]
    assert tokenizer.decode(with_specials, skip_special_tokens=True) == text


def test_heldout_names_round_trip_as_several_subword_tokens(tokenizer):
    for person in generate_people(50, "heldout", seed=0):
        ids = tokenizer(person.full_name, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == person.full_name
        assert len(ids) >= 3  # two names never seen in training: no whole-name token exists
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_special_tokens_have_fixed_ids_and_bos_is_prepended(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer("hello", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id
    smuggled = tokenizer("stop <eos> here", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in smuggled
    padded = tokenizer(["a b c d", "a"], padding=True)["input_ids"]
    assert padded[1][-1] == tokenizer.pad_token_id


@pytest.mark.parametrize("vocab_size", [300, VOCAB_SIZE])
def test_vocab_size_is_honoured(corpus, vocab_size):
    assert len(train_tokenizer(corpus, vocab_size)) == vocab_size


def test_too_small_vocab_is_refused(corpus):
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(corpus, 200)


def test_training_is_deterministic(corpus, tokenizer):
    def bpe_model(trained: PreTrainedTokenizerFast) -> dict:  # vocabulary and merges, in order
        return json.loads(trained.backend_tokenizer.to_str())["model"]

    assert bpe_model(train_tokenizer(corpus, VOCAB_SIZE)) == bpe_model(tokenizer)


def test_saved_tokenizer_loads_offline_from_a_checkpoint_directory(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a checkpoint directory also holds the model's config, whose model_type transformers may not know
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "memoryllm"}))
    save_tokenizer(tokenizer, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    text = "Siaha Biceajuton was born in Lisbon. 🧬 <eos>"
    expected = tokenizer(text)["input_ids"]
    for loaded in (
        load_tokenizer(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path, local_files_only=True),
        PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True),
    ):
        assert loaded(text)["input_ids"] == expected
        assert loaded.decode(expected, skip_special_tokens=True) == text
        assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
        assert len(loaded) == VOCAB_SIZE


def test_loading_from_a_directory_without_tokenizer_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
