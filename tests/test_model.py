"""MemoryLLM (model/): pool rules, injection, checkpoints, memory-state files, K/V cache, generation, and
equivalence with the reference implementation's own outputs (tests/data/reference_tiny/)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoint import tiny_config

from model import MemoryLLM, MemoryLLMConfig, MemoryState, MemoryStateError
from model.memory_pool import dropped_indices, tile_pool

REFERENCE = Path(__file__).parent / "data" / "reference_tiny"
K, N = 4, 12


def small_config(**overrides) -> MemoryLLMConfig:
    """The tiny shape with this file's K, N, vocabulary and window."""
    return tiny_config(K, N, **{"vocab_size": 64, "max_position_embeddings": 48, **overrides})


def tiny_model(seed: int = 0, **overrides) -> MemoryLLM:
    torch.manual_seed(seed)
    return MemoryLLM(small_config(**overrides)).eval()


def ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([tokens])


CONTEXT = ids(*range(3, 13))  # T = 10 > K
SHORT_CONTEXT = ids(5, 9)  # T = 2 < K
QUERY = ids(7, 8, 9, 10, 11)


def injected_model(**overrides) -> MemoryLLM:
    model = tiny_model(**overrides)
    with torch.no_grad():
        model.inject_memory(SHORT_CONTEXT)
        model.inject_memory(CONTEXT, generator=torch.Generator().manual_seed(0))
    return model


def model_with_distinct_pool(**overrides) -> MemoryLLM:
    """An initialised model whose pool rows are all different, so each row can be traced."""
    model = tiny_model(**overrides)
    pool = torch.randn(2, N, 32, generator=torch.Generator().manual_seed(1))
    model.set_memory_state(MemoryState(pool=pool, generation=0, num_injections=0, initialized=True))
    return model


def row_positions(rows: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """Index in `pool` ([n, d]) of each row of `rows`, matched exactly."""
    return [int((pool == row).all(dim=1).nonzero()[0]) for row in rows]


# ------------------------------------------------------------------------------------------------ pool rules


def test_pool_size_and_bookkeeping_after_each_injection():
    model = tiny_model()
    with torch.no_grad():
        for count in range(1, 5):
            model.inject_memory(CONTEXT)
            state = model.memory_state()
            assert state.pool.shape == (2, N, 32)
            assert (state.generation, state.num_injections, state.initialized) == (count, count, True)


def test_update_keeps_survivors_in_order_and_appends_new_tokens_at_the_end():
    model = model_with_distinct_pool()
    before = model.memory.detach().clone()
    with torch.no_grad():
        new_tokens = model.inject_memory(QUERY, generator=torch.Generator().manual_seed(3))
    after = model.memory.detach()
    torch.testing.assert_close(after[:, N - K :], new_tokens, rtol=0, atol=0)
    positions = [row_positions(after[layer, : N - K], before[layer]) for layer in range(2)]
    assert positions[0] == positions[1], "without drop_memory_per_layer all layers keep the same tokens"
    assert positions[0] == sorted(set(positions[0])), "survivors keep their order"


def test_per_layer_drop_draws_each_layer_separately():
    model = model_with_distinct_pool(drop_memory_per_layer=True)
    before = model.memory.detach().clone()
    with torch.no_grad():
        model.inject_memory(QUERY, generator=torch.Generator().manual_seed(3))
    positions = [row_positions(model.memory[layer, : N - K], before[layer]) for layer in range(2)]
    assert all(p == sorted(set(p)) for p in positions)
    assert positions[0] != positions[1]
    dropped = dropped_indices(N, K, 2, per_layer=True, generator=torch.Generator().manual_seed(3))
    expected = [[i for i in range(N) if i not in set(layer.tolist())] for layer in dropped]
    assert positions == expected


@pytest.mark.parametrize(("context", "pattern"), [(SHORT_CONTEXT, [0, 1] * 6), (CONTEXT, [0, 1, 2, 3] * 3)])
def test_first_injection_fills_an_empty_pool_by_tiling(context, pattern):
    model = tiny_model()
    assert not model.initialized
    with torch.no_grad():
        new_tokens = model.inject_memory(context)
    assert new_tokens.shape[1] == min(K, context.shape[1])
    torch.testing.assert_close(model.memory.detach(), new_tokens[:, pattern], rtol=0, atol=0)
    assert tile_pool(torch.arange(5.0)[None, :, None], 12)[0, :, 0].tolist() == [0, 1, 2, 3, 4] * 2 + [3, 4]


def test_context_longer_than_the_window_is_rejected():
    model = tiny_model()
    limit = model.config.max_context_tokens  # 48 - 4 memory tokens - bos
    with torch.no_grad():
        model.inject_memory(torch.zeros(1, limit, dtype=torch.long))
        with pytest.raises(ValueError, match="longer than the model's window"):
            model.inject_memory(torch.zeros(1, limit + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="one context at a time"):
            model.inject_memory(torch.zeros(2, 5, dtype=torch.long))


# ----------------------------------------------------------------------------------------- checkpoint I/O


def test_save_and_load_round_trip_gives_identical_logits_and_memory(tmp_path):
    model = injected_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "memoryllm" and config["rope_theta"] == 10000.0
    loaded = MemoryLLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    assert not loaded.memory.requires_grad and loaded.initialized
    torch.testing.assert_close(loaded.memory, model.memory, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(QUERY).logits, model(QUERY).logits, rtol=0, atol=0)


def test_reference_config_layout_maps_rope_theta_and_torch_dtype(tmp_path):
    layout = small_config().to_dict()
    del layout["rope_parameters"], layout["dtype"]
    layout.update(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(layout))
    config = MemoryLLMConfig.from_pretrained(tmp_path)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.to_dict()["rope_scaling"] == {"type": "linear", "factor": 2.0}


def test_lora_adapters_use_peft_names_and_switch_between_injection_and_query(tmp_path):
    lora = {
        "inference_mode": True,
        "r": 2,
        "lora_alpha": 4,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "up_proj"],
    }
    model = injected_model(lora_config=lora, add_decoder_lora=True)
    names = set(model.state_dict())
    assert {
        "model.layers.0.self_attn.q_proj.base_layer.weight",
        "model.layers.1.mlp.up_proj.lora_A.default.weight",
        "model.layers.0.self_attn.v_proj.lora_B.decoder_adapter.weight",
    } <= names
    assert "model.layers.0.self_attn.o_proj.weight" in names
    assert all(not p.any() for n, p in model.named_parameters() if ".lora_B." in n), (
        "fresh adapters are no-ops"
    )
    q_proj = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        query, injection = model(QUERY).logits, model.inject_memory(CONTEXT, update_memory=False)
        q_proj.lora_B["decoder_adapter"].weight.fill_(0.5)  # the query adapter
        assert not torch.allclose(model(QUERY).logits, query)
        torch.testing.assert_close(model.inject_memory(CONTEXT, update_memory=False), injection)
        q_proj.lora_B["default"].weight.fill_(0.5)  # the injection adapter
        assert not torch.allclose(model.inject_memory(CONTEXT, update_memory=False), injection)
    model.save_pretrained(tmp_path)
    loaded = MemoryLLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(QUERY).logits, model(QUERY).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- memory state


def test_memory_state_file_round_trip_restores_pool_and_moves_the_version_on(tmp_path):
    model = injected_model()
    digest = model.save_memory_state(tmp_path / "state.safetensors")
    saved = model.memory_state()
    with torch.no_grad():
        model.inject_memory(QUERY)
    loaded = model.load_memory_state(tmp_path / "state.safetensors")
    assert len(digest) == 64 and loaded.generation == saved.generation
    torch.testing.assert_close(model.memory.detach(), saved.pool, rtol=0, atol=0)
    assert model.num_injections == saved.num_injections == 2
    assert model.pool_generation == saved.generation + 2  # one update, one load


def test_memory_state_checksum_mismatch_is_refused(tmp_path):
    model = injected_model()
    path = tmp_path / "state.safetensors"
    model.save_memory_state(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of the pool's last value
    path.write_bytes(bytes(data))
    before = model.memory.detach().clone()
    with pytest.raises(MemoryStateError, match="checksum mismatch"):
        model.load_memory_state(path)
    path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(MemoryStateError, match="cannot read"):
        model.load_memory_state(path)
    torch.testing.assert_close(model.memory.detach(), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ queries and cache


def test_cached_memory_keys_values_give_the_uncached_outputs_and_follow_updates():
    model = injected_model()
    with torch.no_grad():
        for _ in range(2):  # the second round runs after an update: the cache must not be stale
            cached = model(QUERY).logits
            torch.testing.assert_close(
                cached, model(QUERY, use_memory_cache=False).logits, rtol=1e-5, atol=1e-5
            )
            model.use_memory_cache = False
            uncached_generation = model.generate(QUERY, max_new_tokens=6, do_sample=False)
            model.use_memory_cache = True
            assert torch.equal(model.generate(QUERY, max_new_tokens=6, do_sample=False), uncached_generation)
            model.inject_memory(CONTEXT)


def test_generate_puts_the_memory_in_front_of_the_prompt():
    model = tiny_model()
    with torch.no_grad():
        without_memory = model.generate(QUERY, max_new_tokens=8, do_sample=False)
        model.inject_memory(CONTEXT)
        with_memory = model.generate(QUERY, max_new_tokens=8, do_sample=False)
        full = model(with_memory[:, :-1]).logits.argmax(-1)[:, QUERY.shape[1] - 1 :]
    assert with_memory.shape == (1, QUERY.shape[1] + 8)
    assert not torch.equal(with_memory, without_memory)
    assert torch.equal(full, with_memory[:, QUERY.shape[1] :]), "cached decoding = one full forward"


def test_left_padded_batch_gives_the_unpadded_outputs():
    model = injected_model()
    batch = torch.tensor([[7, 8, 9, 10, 11], [0, 0, 20, 21, 22]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[1, 2:], model(batch[1:, 2:]).logits[0], rtol=1e-5, atol=1e-5)
        generated = model.generate(
            batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        alone = model.generate(batch[1:, 2:], max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[1, 2:], alone[0])


def test_gradients_flow_through_injections_into_a_later_loss():
    model = tiny_model().train()
    pool = model.updated_memory(CONTEXT)  # empty pool: filled by tiling
    pool = model.updated_memory(SHORT_CONTEXT, memory=pool, generator=torch.Generator().manual_seed(0))
    loss = model(QUERY, memory=pool, labels=QUERY).loss
    loss.backward()
    # new_memory_positional_emb only reaches the loss through the injected tokens
    assert model.new_memory_positional_emb.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert not model.initialized, "the functional path leaves the model's pool alone"


def test_batched_injection_equals_one_context_at_a_time():
    model = tiny_model(num_tokens=4, num_blocks=4, num_memory_tokens=16)
    with torch.no_grad():
        model.new_memory_positional_emb.normal_()  # zero at init: make the marker matter
    pools = torch.randn(3, 2, 16, 32)
    contexts = [ids(5, 6), ids(7, 8, 9, 10, 11, 12), ids(13, 14, 15, 16, 17, 18, 19, 20, 21)]
    padded = torch.zeros(3, 9, dtype=torch.long)
    for row, context in enumerate(contexts):
        padded[row, : context.shape[1]] = context[0]
    lengths = torch.tensor([c.shape[1] for c in contexts])
    batched = model.batched_updated_memory(padded, lengths, pools, torch.Generator().manual_seed(3))
    one_by_one = torch.Generator().manual_seed(3)
    singles = torch.stack([model.updated_memory(c, memory=p, generator=one_by_one)
                           for c, p in zip(contexts, pools, strict=True)])
    torch.testing.assert_close(batched, singles)
    # a batch of pools is queried row by row: row b sees pool b only
    query = ids(3, 4, 5).expand(3, -1)
    together = model(query, memory=batched).logits
    alone = torch.cat([model(query[:1], memory=pool).logits for pool in batched])
    torch.testing.assert_close(together, alone)
    assert not torch.allclose(together[0], together[1])


def test_dtype_follows_the_parameters():
    model = injected_model().to(torch.float64)
    with torch.no_grad():
        new_tokens = model.inject_memory(CONTEXT)
        logits = model(QUERY).logits
    assert new_tokens.dtype == model.memory.dtype == torch.float64
    assert all(k.dtype == torch.float64 for k, _ in model.memory_kv())
    assert logits.dtype == torch.float32  # logits are returned in float32, as the reference does
    reference = injected_model()
    with torch.no_grad():
        reference.inject_memory(CONTEXT)
    torch.testing.assert_close(model.memory.float(), reference.memory, rtol=1e-4, atol=1e-4)
    half = injected_model().to(torch.bfloat16)
    with torch.no_grad():
        assert half.inject_memory(CONTEXT).dtype == torch.bfloat16
        assert half.generate(QUERY, max_new_tokens=3, do_sample=False).shape == (1, QUERY.shape[1] + 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_runs_where_its_parameters_are():
    model = injected_model().cuda()
    with torch.no_grad():
        new_tokens = model.inject_memory(CONTEXT, generator=torch.Generator().manual_seed(0))
        generated = model.generate(QUERY.cuda(), max_new_tokens=3, do_sample=False)
    assert new_tokens.device.type == model.memory.device.type == generated.device.type == "cuda"


# ---------------------------------------------------------------------------------- the reference's outputs


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(REFERENCE / "expected.safetensors")


def reference_model(**overrides) -> MemoryLLM:
    return MemoryLLM.from_pretrained(REFERENCE / "checkpoint", torch_dtype=torch.float32, **overrides).eval()


def assert_matches(actual: torch.Tensor, reference: torch.Tensor) -> None:
    assert actual.shape == reference.shape
    assert (actual - reference).abs().max().item() <= 1e-4


def test_reference_checkpoint_gives_the_reference_logits_and_new_memory(expected):
    model = reference_model()
    with torch.no_grad():
        assert_matches(model(expected["query_ids"]).logits, expected["logits"])
        for name in ("short", "long"):  # T = 5 < K = 8 and T = 20 > K
            new_tokens = model.inject_memory(expected[f"context_{name}_ids"], update_memory=False)
            assert_matches(new_tokens, expected[f"new_memory_{name}"][0])


@pytest.mark.parametrize("prefix", ["", "per_layer_drop."])
def test_reference_update_draws_the_same_survivors_and_pool(expected, prefix):
    model = reference_model(drop_memory_per_layer=bool(prefix))
    torch.manual_seed(1234)  # the reference draws from torch's global CPU generator
    with torch.no_grad():
        model.inject_memory(expected["context_long_ids"])
        assert_matches(model.memory, expected[f"{prefix}memory_after_update"])
        assert_matches(model(expected["query_ids"]).logits, expected[f"{prefix}logits_after_update"])


@pytest.mark.parametrize("name", ["short", "long"])
def test_reference_first_injection_into_an_empty_pool(expected, name):
    model = reference_model()
    model.initialized.fill_(0)
    with torch.no_grad():
        new_tokens = model.inject_memory(expected[f"context_{name}_ids"])
    assert_matches(new_tokens, expected[f"uninitialized.new_memory_{name}"][0])
    assert_matches(model.memory, expected[f"uninitialized.memory_after_first_injection_{name}"])
