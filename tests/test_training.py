"""`ckl train` (a tiny preset through DeepSpeed: checkpoint, reload, resume, determinism) and `ckl eval
retention` on the committed default checkpoint and on documents written outside the project."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from model import MemoryLLM
from model.prompts import answers_match
from model.tokenizer import load_tokenizer
from synthetic import bios, rich_bios, wording

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "model" / "default"
RICH_MODEL = REPO_ROOT / "model" / "rich"
FOREIGN_DOCS = Path(__file__).parent / "data" / "foreign_docs.jsonl"
FOREIGN_WORDING_DOCS = Path(__file__).parent / "data" / "foreign_wording_docs.jsonl"


def ckl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the ckl command line in a fresh process (DeepSpeed sets up its process group per process)."""
    env = {**os.environ, "CKL_CACHE": str(REPO_ROOT / ".cache")}  # reuse DeepSpeed's JIT-built ops
    result = subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def training_summary(directory: Path) -> dict:
    return json.loads((directory / "training.json").read_text())


def test_tiny_training_checkpoints_reloads_resumes_and_repeats_bit_for_bit(tmp_path, mlflow_server):
    """The tiny run of the rich recipe (plain start, word-piece dropout, copy rows, both stages)."""
    interrupted, uninterrupted = tmp_path / "interrupted", tmp_path / "uninterrupted"
    run = ckl("train", "--preset", "tiny-rich", "--out", str(interrupted), "--steps", "4",
              "--mlflow-uri", mlflow_server.uri, cwd=REPO_ROOT)
    first = training_summary(interrupted)
    assert first["step"] == 4 and torch.isfinite(torch.tensor(first["last_loss"]))
    run_id = re.search(r"mlflow run: (\w+)", run.stdout).group(1)
    losses = mlflow.MlflowClient(mlflow_server.uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]

    model = MemoryLLM.from_pretrained(interrupted)
    tokenizer = load_tokenizer(interrupted)
    assert model.config.num_tokens == first["config"]["num_tokens"]
    assert len(tokenizer) == model.config.vocab_size
    assert bool(model.initialized)  # stage B ran: the running pool is the checkpoint's memory

    ckl("train", "--preset", "tiny-rich", "--out", str(interrupted), "--resume", cwd=REPO_ROOT)
    resumed = training_summary(interrupted)
    assert resumed["step"] == resumed["config"]["reader_steps"] + resumed["config"]["memory_steps"] > 4

    ckl("train", "--preset", "tiny-rich", "--out", str(uninterrupted), cwd=REPO_ROOT)
    assert training_summary(uninterrupted)["last_loss"] == resumed["last_loss"]
    assert "answer_exact_bank" in resumed["smoothed_metrics"]  # stage B's bank rows ran
    assert "answer_exact_prompt" in resumed["smoothed_metrics"]  # ... and its rows read in the prompt


def test_resume_refuses_a_directory_without_trainer_state(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "train", "--preset", "tiny", "--out",
                             str(tmp_path), "--resume"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "trainer_state.pt" in result.stderr


def test_init_from_starts_a_run_from_a_checkpoints_weights_and_tokenizer(tmp_path):
    start, continued, fresh = tmp_path / "start", tmp_path / "continued", tmp_path / "fresh"
    ckl("train", "--preset", "tiny", "--out", str(start), cwd=REPO_ROOT)
    ckl("train", "--preset", "tiny", "--seed", "1", "--out", str(fresh), "--steps", "1", cwd=REPO_ROOT)
    ckl("train", "--preset", "tiny", "--seed", "1", "--init-from", str(start), "--out", str(continued),
        "--steps", "1", cwd=REPO_ROOT)
    summary = training_summary(continued)
    assert summary["step"] == 1 and summary["config"]["init_from"] == str(start)
    assert (continued / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
    assert (fresh / "tokenizer.json").read_bytes() != (start / "tokenizer.json").read_bytes()

    def largest_change(directory: Path) -> float:
        weights = dict(MemoryLLM.from_pretrained(directory).named_parameters())
        return max((weights[name] - param).abs().max().item()
                   for name, param in MemoryLLM.from_pretrained(start).named_parameters())

    # one warm-up step of AdamW moves a weight by at most about lr / warmup_steps = 1.5e-3
    assert largest_change(continued) < 0.005 < largest_change(fresh)
    ckl("train", "--preset", "tiny", "--seed", "1", "--out", str(continued), "--resume", cwd=REPO_ROOT)
    resumed = training_summary(continued)
    assert resumed["step"] == resumed["config"]["reader_steps"] + resumed["config"]["memory_steps"] > 1
    assert resumed["config"]["init_from"] == str(start)  # the record of where the run started stays


def test_init_from_refuses_a_checkpoint_of_another_shape(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "train", "--preset", "tiny", "--init-from",
                             str(DEFAULT_MODEL), "--out", str(tmp_path)], cwd=REPO_ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "shape" in result.stderr and "hidden_size" in result.stderr
    assert not (tmp_path / "training.json").exists()


def test_a_recipe_without_stage_a_refuses_to_start_from_random_weights(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "train", "--preset", "rich-ask-all", "--out",
                             str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--init-from" in result.stderr
    assert not (tmp_path / "training.json").exists()


def test_default_checkpoint_recalls_injected_heldout_people_by_name(tmp_path):
    out_json, out_png = tmp_path / "retention.json", tmp_path / "retention.png"
    ckl("eval", "retention", "--model", str(DEFAULT_MODEL), "--people", "12", "--later", "0,1",
        "--filler-docs", "5", "--json", str(out_json), "--plot", str(out_png), cwd=tmp_path)
    result = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["documents"] == 12 and result["curve"][0]["questions"] == 60
    assert result["baseline_accuracy"] <= 0.1
    # the committed checkpoint measured 92% / 97% here and 91% / 95% on 100 people (issue 5's bar: 90 / 80)
    assert result["fresh_accuracy"] >= 0.75
    assert result["curve"][1]["later"] == 1 and result["curve"][1]["accuracy"] >= 0.75
    assert result["lm_loss"] is not None and result["lm_loss"] < 4.0


def test_eval_reading_reads_documents_in_the_prompt_with_the_pool_switched_off(tmp_path):
    out_json = tmp_path / "reading.json"
    printed = ckl("eval", "reading", "--model", str(RICH_MODEL), "--split", "heldout-names", "--documents",
                  "16", "--people", "1,4", "--json", str(out_json), cwd=tmp_path).stdout
    one, four = json.loads(out_json.read_text())["rows"]
    assert (one["people"], four["people"]) == (1, 4) and one["questions"] == four["questions"] == 80
    # the biography in the prompt is read (measured 93% on 64 documents, 91% on these 16; nothing in the
    # prompt: ~1%)
    assert one["accuracy"] >= 0.8
    # model/rich binds: among 4 people it keeps most of its one-person accuracy, where a model that reads
    # values without knowing whose they are picks one of them at random (measured 80% against 23%)
    assert four["accuracy"] >= 2 * one["accuracy"] / 4
    assert "random pick" in printed


def test_reading_switches_the_pool_off_and_restores_it():
    from monitoring.reading import measure_reading
    from monitoring.retention import ProbedText, QueryRunner

    model, tokenizer = MemoryLLM.from_pretrained(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    document = ProbedText.of(next(iter(bios.bio_documents(1, split="heldout", seed=3))))
    in_prompt = measure_reading(model, tokenizer, [document], people=(1,))
    runner = QueryRunner(model, tokenizer)
    runner.inject(document.text)  # now the pool holds the answers too
    said = runner.answer([q for q, _ in document.probes], 8)
    assert sum(answers_match(s, a) for s, (_, a) in zip(said, document.probes, strict=True)) >= 3
    held = model.memory_state()
    # the default model reads poorly in the prompt (about 10%) and well through memory: a pool left on
    # would show here
    assert measure_reading(model, tokenizer, [document], people=(1,)) == in_prompt
    after = model.memory_state()
    assert torch.equal(after.pool, held.pool) and after.initialized
    assert after.num_injections == held.num_injections


def test_eval_wording_tries_each_heldout_phrasing_and_template_alone(tmp_path):
    out_json = tmp_path / "wording.json"
    printed = ckl("eval", "wording", "--model", str(RICH_MODEL), "--people", "4", "--json", str(out_json),
                  cwd=tmp_path).stdout
    result = json.loads(out_json.read_text())
    kinds = [row["kind"] for row in result["trials"]]
    assert kinds == [kind for attribute in bios.ATTRIBUTES for kind in (
        ["reference"] + ["question"] * len(rich_bios.held_out(wording.QUESTION_TEMPLATES[attribute]))
        + ["template"] * len(rich_bios.held_out(wording.SENTENCE_TEMPLATES[attribute]))
        + ["training template"] * sum(t.index("{value}") < t.index("{name}")
                                      for t in rich_bios.wording_of("train").sentences[attribute]))]
    for row in result["trials"]:
        assert row["accuracy"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 people, one question each
        assert row["wording"] in printed
    templates = [row for row in result["trials"] if row["kind"] == "template"]
    value_first = [row["accuracy"] for row in templates if row["value_first"]]
    assert len(value_first) == sum(  # the held-out templates that state the value before the name
        t.index("{value}") < t.index("{name}")
        for templates in wording.SENTENCE_TEMPLATES.values() for t in rich_bios.held_out(templates))
    assert result["summary"]["held-out templates, value first"] == pytest.approx(
        sum(value_first) / len(value_first))
    trained = [row["accuracy"] for row in result["trials"] if row["kind"] == "training template"]
    assert all(row["value_first"] for row in result["trials"] if row["kind"] == "training template")
    assert result["summary"]["training templates, value first"] == pytest.approx(sum(trained) / len(trained))
    assert "[value first]" in printed and "held-out question phrasings" in printed
    assert result["through"] == "memory" and "injected into memory" in printed
    ckl("eval", "wording", "--model", str(RICH_MODEL), "--people", "1", "--through", "prompt", "--json",
        str(out_json), cwd=tmp_path)
    in_prompt = json.loads(out_json.read_text())
    assert in_prompt["through"] == "prompt" and len(in_prompt["trials"]) == len(result["trials"])


def test_eval_retention_takes_foreign_documents_with_probes(tmp_path):
    out_json = tmp_path / "docs.json"
    result = ckl("eval", "retention", "--model", str(DEFAULT_MODEL), "--docs", str(FOREIGN_DOCS),
                 "--later", "0,1,2", "--filler-docs", "0", "--json", str(out_json), cwd=tmp_path)
    data = json.loads(out_json.read_text())
    assert data["documents"] == 3  # the document without probes is injected, not asked
    assert [p["questions"] for p in data["curve"]] == [9, 9, 9]
    assert data["lm_loss"] is None
    assert data["fresh_accuracy"] >= 6 / 9  # names and wording not of our generator (measured 8/9)
    assert "no-injection baseline" in result.stdout


def test_rich_checkpoint_reads_hand_written_wording_the_default_cannot(tmp_path):
    fresh = {}
    for name, model in (("default", DEFAULT_MODEL), ("rich", RICH_MODEL)):
        out_json = tmp_path / f"{name}.json"
        ckl("eval", "retention", "--model", str(model), "--docs", str(FOREIGN_WORDING_DOCS), "--later", "0",
            "--filler-docs", "0", "--json", str(out_json), cwd=tmp_path)
        data = json.loads(out_json.read_text())
        assert data["documents"] == 36 and data["curve"][0]["questions"] == 156
        assert data["baseline_accuracy"] <= 0.05
        fresh[name] = data["fresh_accuracy"]
    # measured: default 3.8%, rich 78.8% (docs/default_model.md)
    assert fresh["default"] <= 0.10 and fresh["rich"] >= 0.7
    assert training_summary(RICH_MODEL)["config"]["corpus"] == "rich"


def test_eval_retention_measures_the_heldout_wording_split(tmp_path):
    out_json = tmp_path / "wording.json"
    ckl("eval", "retention", "--model", str(DEFAULT_MODEL), "--split", "heldout-wording", "--people", "3",
        "--later", "0,1", "--filler-docs", "0", "--json", str(out_json), cwd=tmp_path)
    data = json.loads(out_json.read_text())
    assert data["docs"] == "heldout-wording people" and data["documents"] == 3
    assert [p["questions"] for p in data["curve"]] == [15, 15]
    assert data["baseline_accuracy"] <= 0.2
    assert len(data["answers"]) == 30 and {a["later"] for a in data["answers"]} == {0, 1}
    assert list(data["by_attribute"]) == ["birth_date", "birth_city", "university", "major", "employer"]
    assert {a["document"] for a in data["answers"]} == {0, 1, 2}
    assert list(data["wrong_answers"]) == ["another document's", "own, other question", "nobody's"]
    for shares in zip(*(per_later.values() for per_later in data["wrong_answers"].values()), strict=True):
        assert sum(shares) == pytest.approx(1.0)  # every wrong answer has one kind
    fresh = [a for a in data["answers"] if a["later"] == 0]
    assert data["fresh_accuracy"] == sum(answers_match(a["said"], a["answer"]) for a in fresh) / 15


def test_spacing_puts_filler_after_each_probed_document_only():
    from monitoring.retention import ProbedText, spaced

    stream = [ProbedText("a", (("q", "x"),)), ProbedText("b", ()), ProbedText("c", (("q", "y"),))]
    result = spaced(stream, ["f1", "f2", "f3", "f4", "f5"], 2)
    assert [doc.text for doc in result] == ["a", "f1", "f2", "b", "c", "f3", "f4"]
    assert [bool(doc.probes) for doc in result] == [True, False, False, False, True, False, False]
    assert spaced(stream, [], 0) == stream
    with pytest.raises(ValueError, match="needs 4 spacer texts"):
        spaced(stream, ["f1"], 2)


def test_eval_retention_spacing_asks_each_document_with_filler_between(tmp_path):
    out_json = tmp_path / "spaced.json"
    ckl("eval", "retention", "--model", str(DEFAULT_MODEL), "--people", "3", "--later", "0,2",
        "--spacing", "2", "--filler-docs", "0", "--json", str(out_json), cwd=tmp_path)
    data = json.loads(out_json.read_text())
    assert data["spacing"] == 2 and data["documents"] == 3
    assert {a["document"] for a in data["answers"]} == {0, 3, 6}  # stream positions: 2 fillers after each
    after_two = [a for a in data["answers"] if a["later"] == 2]
    assert len(after_two) == 15  # asked right before the next person is injected


def test_retention_without_the_baseline_asks_the_same_and_reports_none():
    from monitoring.retention import ProbedText, measure_retention

    model, tokenizer = MemoryLLM.from_pretrained(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    stream = [ProbedText.of(doc) for doc in bios.bio_documents(3, split="heldout", seed=7)]
    with_baseline = measure_retention(model, tokenizer, stream, later=(0, 1), progress=False)
    without = measure_retention(model, tokenizer, stream, later=(0, 1), progress=False, baseline=False)
    assert with_baseline["baseline_accuracy"] is not None and without["baseline_accuracy"] is None
    assert without["answers"] == with_baseline["answers"] and without["curve"] == with_baseline["curve"]


@pytest.mark.parametrize("later", ["-1", "a,b", ""])
def test_eval_retention_rejects_bad_later_lists(later, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cli", "eval", "retention", "--later", later],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2


def test_wrong_answers_are_told_apart_by_where_their_value_comes_from():
    from monitoring.answers import wrong_answer_kinds

    def said(later, document, answer, value):
        return {"later": later, "document": document, "question": "?", "answer": answer, "said": value}

    answers = [
        said(0, 0, "Riga", "Riga"),  # right: not counted
        said(0, 0, "Physics", "Lima"),  # another document's city
        said(0, 1, "Lima", "Riga"),  # another document's city
        said(0, 1, "Oracle", "lima"),  # its own city for another question (case does not matter)
        said(0, 1, "Nursing", "Chengdu"),  # stated by no document
        said(1, 0, "Riga", "Nursing"),  # another document's major, one injection later
    ]
    assert wrong_answer_kinds(answers) == {
        "another document's": {0: 0.5, 1: 1.0},
        "own, other question": {0: 0.25, 1: 0.0},
        "nobody's": {0: 0.25, 1: 0.0},
    }
    assert wrong_answer_kinds(answers[:1]) == {}
