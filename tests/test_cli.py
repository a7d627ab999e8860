"""The `ckl` command hub: every command listed, only the chosen one imported; `--help` without torch; flag
values checked when parsed (cli/argtypes.py)."""

import argparse
import json
import re
import subprocess
import sys

import pytest

from cli.argtypes import fraction, open_fraction
from cli.main import COMMANDS, build_parser
from compression.settings import SLOT_DTYPES, SlotFormat
from pipelines import settings
from runtime.supervisor import DEFAULT_READY_TIMEOUT_S
from serving.settings import DEFAULT_MAX_WAITING_QUERIES

REPORT_IMPORTS = """
import json
import sys
from cli import main
try:
    main.main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
      {"torch", "airflow", "mlflow", "kafka", "cli", "pipelines", "serving", "model", "monitoring",
       "compression", "documents", "localservices", "synthetic", "training"})))
"""


def imported_by(*argv: str) -> tuple[str, list[str]]:
    result = subprocess.run([sys.executable, "-c", REPORT_IMPORTS, *argv], capture_output=True, text=True,
                            timeout=120)
    out, marker = result.stdout, "IMPORTED "
    return out[: out.index(marker)], json.loads(out[out.index(marker) + len(marker):])


def test_ckl_help_lists_every_command_without_importing_any():
    help_text, modules = imported_by("--help")
    assert all(name in help_text for name in COMMANDS)
    assert modules == ["cli", "cli.main"]


def test_a_command_imports_its_own_module_only():
    help_text, modules = imported_by("produce", "--help")
    assert "TOPIC" in help_text and "cli.produce" in modules
    assert not {"cli.ingest", "cli.rollback", "cli.serve"} & set(modules)
    assert "torch" not in modules and "airflow" not in modules


@pytest.mark.parametrize("argv", [("serve", "--help"), ("eval", "retention", "--help")])
def test_help_of_the_model_commands_shows_their_defaults_without_torch(argv):
    help_text, modules = imported_by(*argv)
    assert "--slot-dtype" in help_text and "float16" in help_text
    assert "torch" not in modules


def test_eval_reading_explains_itself_without_torch():
    help_text, modules = imported_by("eval", "reading", "--help")
    assert "random pick" in help_text and "--people" in help_text and "1,2,4,8" in help_text
    assert "torch" not in modules


def test_eval_wording_explains_itself_without_torch():
    help_text, modules = imported_by("eval", "wording", "--help")
    assert "reference trial" in help_text and "--people" in help_text and "--split" not in help_text
    assert "torch" not in modules


@pytest.mark.parametrize("module", ["compression.settings", "serving.settings", "serving.process"])
def test_settings_and_the_server_process_import_without_torch(module):
    check = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def parse(*argv: str):
    return build_parser(argv[0]).parse_args(argv)


@pytest.mark.parametrize("argv,flag,value", [
    (("serve",), "--slot-dtype", "int4"), (("serve",), "--keys", "tfidf"),
    (("eval", "retention"), "--keys", "tfidf"),
])
def test_choices_the_settings_do_not_know_are_refused(capsys, argv, flag, value):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv, flag, value)
    assert exit_.value.code == 2
    assert f"argument {flag}: invalid choice: {value!r}" in capsys.readouterr().err


def test_serve_parses_good_values_and_takes_its_defaults_from_the_settings():
    args = parse("serve", "--port", "0", "--context-tokens", "64", "--top-k", "2", "--retrieval-budget",
                 "256", "--slots", "8", "--slot-dtype", "int8", "--checkpoint-every", "1",
                 "--checkpoint-every-s", "0.5", "--max-waiting-queries", "0", "--follow", "2")
    assert (args.port, args.context_tokens, args.top_k, args.retrieval_budget, args.slots, args.slot_dtype,
            args.checkpoint_every, args.checkpoint_every_s, args.max_waiting_queries, args.follow) == (
        0, 64, 2, 256, 8, "int8", 1, 0.5, 0, 2.0)
    defaults = parse("serve")
    assert (defaults.slots, defaults.slot_dtype) == (SlotFormat().slots, SlotFormat().dtype)
    assert defaults.max_waiting_queries == DEFAULT_MAX_WAITING_QUERIES
    assert SlotFormat().dtype in SLOT_DTYPES


def test_eval_retention_parses_good_values():
    args = parse("eval", "retention", "--people", "3", "--filler-docs", "0", "--top-k", "2", "--slots", "4",
                 "--slot-dtype", "int8")
    assert (args.people, args.filler_docs, args.top_k, args.slots, args.slot_dtype) == (3, 0, 2, 4, "int8")


@pytest.mark.parametrize("argv,flag,value,allowed", [
    (("serve",), "--port", "-1", "an integer from 0 to 65535"),
    (("serve",), "--port", "65536", "an integer from 0 to 65535"),
    (("serve",), "--context-tokens", "0", "an integer >= 1"),
    (("serve",), "--top-k", "0", "an integer >= 1"),
    (("serve",), "--retrieval-budget", "-5", "an integer >= 1"),
    (("serve",), "--slots", "0", "an integer >= 1"),
    (("serve",), "--checkpoint-every", "0", "an integer >= 1"),
    (("serve",), "--checkpoint-every", "2.5", "an integer >= 1"),
    (("serve",), "--checkpoint-every-s", "0", "a finite number > 0"),
    (("serve",), "--checkpoint-every-s", "nan", "a finite number > 0"),
    (("serve",), "--max-waiting-queries", "-1", "an integer >= 0"),
    (("serve",), "--max-waiting-queries", "many", "an integer >= 0"),
    (("serve",), "--follow", "-2", "a finite number > 0"),
    (("serve",), "--follow", "inf", "a finite number > 0"),
    (("eval", "retention"), "--people", "0", "an integer >= 1"),
    (("eval", "retention"), "--filler-docs", "-1", "an integer >= 0"),
    (("eval", "retention"), "--top-k", "0", "an integer >= 1"),
    (("eval", "retention"), "--slots", "-3", "an integer >= 1"),
    (("eval", "reading"), "--documents", "0", "an integer >= 1"),
    (("eval", "reading"), "--people", "0,2", "positive integers"),
    (("eval", "wording"), "--people", "0", "an integer >= 1"),
    (("report",), "--window", "0", "an integer >= 1"),
    (("data", "bios", "--out=x"), "--train-people", "-1", "an integer >= 0"),
    (("ingest",), "--batch-size", "0", "an integer >= 1"),
    (("ingest",), "--poll-timeout", "0", "a finite number > 0"),
    (("ingest",), "--poll-timeout", "-1.5", "a finite number > 0"),
    (("ingest",), "--probe-questions", "-1", "an integer >= 0"),
    (("ingest",), "--probe-share", "0", "a number > 0 and < 1"),
    (("ingest",), "--probe-share", "1", "a number > 0 and < 1"),
    (("ingest",), "--probe-share", "nan", "a number > 0 and < 1"),
    (("services", "up"), "--timeout", "0", "a finite number > 0"),
    (("services", "up"), "--timeout", "inf", "a finite number > 0"),
    (("bank", "ls"), "--limit", "-1", "an integer >= 0"),
    (("produce", "ckl.docs", "docs.jsonl"), "--partitions", "0", "an integer >= 1"),
    (("train",), "--steps", "0", "an integer >= 1"),
    (("train",), "--steps", "ten", "an integer >= 1"),
    (("report",), "--threshold", "-0.1", "a number from 0 to 1"),
    (("report",), "--threshold", "80", "a number from 0 to 1"),
    (("train",), "--seed", "-1", "an integer from 0 to 18446744073709551615"),
    (("eval", "retention"), "--seed", str(2**64), "an integer from 0 to 18446744073709551615"),
    (("data", "bios", "--out=x"), "--seed", "1.5", "an integer from 0 to 18446744073709551615"),
])
def test_every_command_refuses_an_impossible_value_naming_the_flag_and_the_range(capsys, argv, flag, value,
                                                                                 allowed):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv, f"{flag}={value}")
    assert exit_.value.code == 2
    assert f"argument {flag}: expected {allowed}, got {value!r}" in capsys.readouterr().err


def test_ingest_parses_good_values_and_keeps_the_settings_defaults():
    args = parse("ingest", "--batch-size", "1", "--poll-timeout", "0.5", "--probe-questions", "0",
                 "--probe-share", "0.9")
    assert (args.batch_size, args.poll_timeout, args.probe_questions, args.probe_share) == (1, 0.5, 0, 0.9)
    defaults = parse("ingest")
    assert (defaults.batch_size, defaults.poll_timeout, defaults.probe_questions, defaults.probe_share) == (
        settings.DEFAULT_BATCH_SIZE, settings.DEFAULT_POLL_TIMEOUT_S, settings.DEFAULT_PROBE_QUESTIONS,
        settings.DEFAULT_PROBE_SHARE)


def test_the_other_commands_parse_good_values_and_keep_their_defaults():
    assert parse("services", "up", "--timeout", "0.5").timeout == 0.5
    assert parse("services", "status").timeout == DEFAULT_READY_TIMEOUT_S
    assert (parse("bank", "ls", "--limit", "0").limit, parse("bank", "ls").limit) == (0, 20)
    produce = ("produce", "ckl.docs", "docs.jsonl")
    assert (parse(*produce, "--partitions", "1").partitions, parse(*produce).partitions) == (1, None)
    assert (parse("train", "--steps", "1").steps, parse("train").steps) == (1, None)
    thresholds = [parse("report", "--threshold", value).threshold for value in ("0", "0.5", "1")]
    assert thresholds + [parse("report").threshold] == [0.0, 0.5, 1.0, 0.8]


@pytest.mark.parametrize("flag,value", [("--people", "0"), ("--batch-size", "-16")])
def test_demo_refuses_an_impossible_value_before_starting_anything(capsys, flag, value):
    from cli import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main([f"{flag}={value}"])
    assert exit_.value.code == 2
    assert f"argument {flag}: expected an integer >= 1, got {value!r}" in capsys.readouterr().err


def test_demo_parses_good_values_and_keeps_its_defaults():
    from cli import demo

    args = demo.build_parser().parse_args(["--people", "1", "--batch-size", "1", "--seed", "3"])
    assert (args.people, args.batch_size, args.seed) == (1, 1, 3)
    defaults = demo.build_parser().parse_args([])
    assert (defaults.people, defaults.batch_size, defaults.seed) == (40, 16, None)


@pytest.mark.parametrize("helper,good,bad,allowed", [
    (fraction, {"0": 0.0, "0.25": 0.25, "1": 1.0, "1e-3": 0.001},
     ["-0.1", "1.01", "nan", "inf", "half", ""], "a number from 0 to 1"),
    (open_fraction, {"0.25": 0.25, "1e-9": 1e-9, "0.999": 0.999},
     ["0", "1", "-0.5", "2", "nan", "-inf", "a quarter"], "a number > 0 and < 1"),
])
def test_the_fraction_helpers_take_their_range_and_refuse_the_rest(helper, good, bad, allowed):
    assert {text: helper(text) for text in good} == good
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"expected {allowed}, got {text!r}")):
            helper(text)
