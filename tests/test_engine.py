"""DeepSpeed hosting (model/engine.py): same outputs as the plain MemoryLLM, dtype from the config, tensor
parallelism over two CPU ranks under the `deepspeed` launcher, and the shared distributed environment."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_model import CONTEXT, QUERY, SHORT_CONTEXT, injected_model, tiny_model

from model import MemoryLLM
from model.distributed import prepare_distributed_env
from model.engine import EngineConfig, HostedMemoryLLM, load_engine
from runtime.paths import cache_dir
from runtime.supervisor import free_port

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_SIZE",
    "LOCAL_WORLD_SIZE",
    "TORCH_EXTENSIONS_DIR",
    "DS_ACCELERATOR",
)


@pytest.fixture(autouse=True)
def isolated_environment():
    """The engine fills in distributed defaults; keep them out of later tests and their subprocesses."""
    saved = dict(os.environ)
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def cpu_config(**overrides) -> EngineConfig:
    return EngineConfig(**{"dtype": "float32", "device": "cpu", "cache_dir": cache_dir(), **overrides})


def test_engine_logits_equal_the_plain_model_before_and_after_injections():
    model = tiny_model()
    plain = copy.deepcopy(model)
    hosted = HostedMemoryLLM(model, cpu_config())
    assert hosted.model is model and hosted.engine.module is model
    generator_seed = 5
    with torch.no_grad():
        before = hosted(QUERY).logits
        torch.testing.assert_close(before, plain(QUERY).logits, rtol=0, atol=0)
        for context in (SHORT_CONTEXT, CONTEXT):  # tiling into the empty pool, then an update
            hosted.model.inject_memory(context, generator=torch.Generator().manual_seed(generator_seed))
            plain.inject_memory(context, generator=torch.Generator().manual_seed(generator_seed))
        after = hosted(QUERY).logits
        torch.testing.assert_close(after, plain(QUERY).logits, rtol=0, atol=0)
        torch.testing.assert_close(after, hosted(QUERY, use_memory_cache=False).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after, atol=1e-3), "the memory must change the prediction"
    torch.testing.assert_close(hosted.model.memory, plain.memory, rtol=0, atol=0)


def test_generate_through_the_engine_matches_the_plain_model():
    model = injected_model()
    plain = copy.deepcopy(model)
    hosted = HostedMemoryLLM(model, cpu_config())
    with torch.no_grad():
        generated = hosted.generate(
            QUERY, attention_mask=torch.ones_like(QUERY), max_new_tokens=8, do_sample=False
        )
        expected = plain.generate(
            QUERY, attention_mask=torch.ones_like(QUERY), max_new_tokens=8, do_sample=False
        )
    assert generated.shape == (1, QUERY.shape[1] + 8)
    assert torch.equal(generated, expected)


def test_dtype_from_the_config_is_honoured(tmp_path):
    injected_model().save_pretrained(tmp_path)
    hosted = load_engine(tmp_path, cpu_config(dtype="bfloat16"))
    plain = MemoryLLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert hosted.dtype == torch.bfloat16
    assert {p.dtype for p in hosted.model.parameters()} == {torch.bfloat16}
    assert hosted.model.model.rotary_emb.inv_freq.dtype == torch.float32, "RoPE frequencies stay float32"
    with torch.no_grad():
        torch.testing.assert_close(hosted(QUERY).logits, plain(QUERY).logits, rtol=0, atol=0)
    auto = load_engine(tmp_path, cpu_config(dtype="auto"))
    assert auto.dtype == auto.model.memory.dtype == torch.float32, "auto keeps the checkpoint's dtype"
    with pytest.raises(ValueError, match="dtype must be"):
        EngineConfig(dtype="float8")


def test_tensor_parallel_ranks_give_the_plain_model_outputs_with_lora_and_tied_embeddings(tmp_path):
    lora = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    }
    model = injected_model(lora_config=lora, add_decoder_lora=True, tie_word_embeddings=True)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero at initialisation: make the adapters matter
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(len(name)))
    checkpoint, out = tmp_path / "checkpoint", tmp_path / "out"
    model.save_pretrained(checkpoint)
    out.mkdir()
    # the environment the `deepspeed --num_gpus 2` launcher gives its ranks (the launcher itself costs
    # another ~15 s of imports here; `deepspeed --num_gpus 2 tests/engine_tp_worker.py ...` works the same)
    launcher_env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
        "LOCAL_SIZE": "2",
    }
    command = [
        sys.executable,
        str(REPO / "tests" / "engine_tp_worker.py"),
        str(checkpoint),
        str(out),
        "--cache-dir",
        str(cache_dir()),
    ]
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                **launcher_env,
                "DS_ACCELERATOR": "cpu",
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
            },
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [process.communicate(timeout=300)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]

    plain = MemoryLLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        expected = {
            "logits": plain(QUERY).logits,
            "new_tokens": plain.new_memory_tokens(CONTEXT),
            "generated": plain.generate(QUERY, max_new_tokens=6, do_sample=False),
        }
    for result in ranks:
        assert (result["world_size"], result["q_proj_rows"]) == (2, model.config.hidden_size // 2), "sharded"
        for name in ("logits", "logits_uncached"):
            torch.testing.assert_close(result[name], expected["logits"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result["new_tokens"], expected["new_tokens"], rtol=1e-4, atol=1e-4)
        assert torch.equal(result["generated"], expected["generated"])
    # ranks seeded differently before hosting still drop the same pool tokens
    torch.testing.assert_close(ranks[0]["pool_after_update"], ranks[1]["pool_after_update"], rtol=0, atol=0)
    torch.testing.assert_close(
        ranks[0]["logits_after_update"], ranks[1]["logits_after_update"], rtol=0, atol=0
    )


def test_distributed_env_gets_single_process_defaults_and_keeps_the_launchers(tmp_path):
    prepare_distributed_env(tmp_path, torch.device("cpu"))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_SIZE"]) == ("0", "1", "1")
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    for name in DISTRIBUTED_ENV:
        os.environ.pop(name, None)
    os.environ.update({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "29999", "LOCAL_WORLD_SIZE": "2"})
    prepare_distributed_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("1", "2", "29999")
    assert os.environ["LOCAL_SIZE"] == "2", "torchrun's LOCAL_WORLD_SIZE is what DeepSpeed calls LOCAL_SIZE"
    assert "TORCH_EXTENSIONS_DIR" not in os.environ
