"""The `ckl` command line: one entry point, one subcommand per module.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Only the chosen command's
module is imported (the others are listed by name and help alone), so `ckl --help` stays fast; command
modules keep heavy imports (torch, airflow) inside `run`, which keeps `ckl COMMAND --help` fast too.
"""

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "services": ("cli.services", "start, stop or inspect the local Kafka broker and MLflow server"),
    "produce": ("cli.produce", "publish documents from a JSONL file to a Kafka topic"),
    "data": ("cli.data", "generate data: `ckl data bios` (biographies with probes, filler text)"),
    "ingest": ("cli.ingest", "consume documents from Kafka into the model server's memory"),
    "train": ("cli.train", "train a MemoryLLM with DeepSpeed (`--preset default`: model/default)"),
    "eval": ("cli.eval", "evaluate a model: `ckl eval retention` (recall after later injections) or "
                         "`ckl eval reading` (documents in the prompt)"),
    "bank": ("cli.bank", "inspect the memory bank: `ckl bank ls|show|stats`"),
    "report": ("cli.report", "the retention dashboard (HTML); `--check` alerts on low retention"),
    "snapshots": ("cli.snapshots", "list the server's pool checkpoints: `ckl snapshots list`"),
    "rollback": ("cli.rollback", "take the memory back: `ckl rollback VERSION --replay|--skip`"),
    "serve": ("cli.serve", "run the model server: queries, memory injection and snapshots over HTTP"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command; only `command`'s module is imported, to add
    its arguments."""
    parser = argparse.ArgumentParser(
        prog="ckl",
        description="ckl: keep a MemoryLLM current from a Kafka stream of documents.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # `ckl` has no options of its own
    args = build_parser(command).parse_args(argv)
    return importlib.import_module(args._module).run(args)

