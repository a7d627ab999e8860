"""The default model's tokenizer: a small byte-level BPE the project trains itself, kept in each checkpoint.

Byte-level: the base alphabet is all 256 bytes, so any UTF-8 text encodes (words never seen in training,
such as held-out names, emoji or CJK, become several byte-level tokens) and decodes back to the same
string. Special tokens: <pad> (id 0), <bos> (1), <eos> (2). Like Llama's tokenizer, encoding with
`add_special_tokens=True` (the default) puts <bos> in front; pass `add_special_tokens=False` for raw ids.
The same strings inside a text are ordinary text (`split_special_tokens`), so a document cannot smuggle
control tokens in.

A checkpoint directory holds tokenizer.json, tokenizer_config.json and special_tokens_map.json; it loads
offline with `load_tokenizer(dir)`, `AutoTokenizer.from_pretrained(dir)` or
`PreTrainedTokenizerFast.from_pretrained(dir)`.
"""

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, show_progress: bool = False,
                    ) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials and the 256 bytes included) on `texts`.

    The vocabulary is exactly `vocab_size` when the texts offer enough distinct merges, fewer otherwise.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (3 special tokens + 256 bytes), "
                         f"got {vocab_size}")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    """Write the tokenizer into a (checkpoint) directory, with the legacy special_tokens_map.json too."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    special_tokens = json.dumps(tokenizer.special_tokens_map, indent=2)
    (directory / SPECIAL_TOKENS_MAP_FILE).write_text(special_tokens + "\n", encoding="utf-8")


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved with `save_tokenizer`, from local files only."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {directory}")
    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
