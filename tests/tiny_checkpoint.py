"""A tiny random MemoryLLM checkpoint with its tokenizer, for tests that need a model server before a
trained one exists (`from tiny_checkpoint import make_tiny_checkpoint`; serve it with serving.process)."""

from pathlib import Path

TOKENIZER_TEXTS = [
    "Ada Lovelace was born in London in 1815 and wrote the first published algorithm.",
    "Q: Where was Ada Lovelace born?\nA: London\n",
    "The river flows north through the valley; the town on its bank is called Millbrook.",
    "Kafka topics hold documents; the model server injects them into memory in order.",
]


def tiny_config(tokens_per_injection: int, pool_size: int, **overrides):
    """A tiny MemoryLLMConfig: 2 layers, d=32, 4 heads (2 for keys/values), MLP 64, K tokens per injection
    out of a pool of N; `overrides` sets any other field."""
    from model import MemoryLLMConfig

    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_tokens=tokens_per_injection,
        num_blocks=pool_size // tokens_per_injection,
        num_memory_tokens=pool_size,
        initializer_range=0.3,  # large enough that the memory visibly changes predictions
    )
    return MemoryLLMConfig(**{**fields, **overrides})


def make_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A random MemoryLLM (2 layers, d=32, K=8, N=32, window 128) with a byte-level tokenizer, saved."""
    import torch

    from model import MemoryLLM
    from model.tokenizer import save_tokenizer, train_tokenizer

    tokenizer = train_tokenizer(TOKENIZER_TEXTS, vocab_size=320)
    config = tiny_config(8, 32, vocab_size=len(tokenizer), max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    MemoryLLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory
