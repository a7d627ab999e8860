"""`ckl eval wording`: which held-out question phrasings and sentence templates a checkpoint cannot read.

Each held-out piece of wording (synthetic/rich_bios.py) is tried alone: plain biographies of held-out
people in training wording, with only that phrasing asked or only that template stating its attribute,
each person alone in the prompt with the pool switched off (as `ckl eval reading`). Every trial of an
attribute uses the same people and the same other sentences as its reference trial (training wording
only), so a trial's fall below the reference is that piece's.
"""

import argparse
import json

from cli.argtypes import positive_int, seed_number
from synthetic import rich_bios

DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_wording_parser(evaluations, add_shared_arguments) -> None:
    """`ckl eval wording` under `evaluations` (the subparsers of `ckl eval`)."""
    sub = evaluations.add_parser(
        "wording", help="accuracy on each held-out question phrasing and sentence template alone",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_shared_arguments(sub, splits=False)
    sub.add_argument("--people", type=positive_int, default=40,
                     help="held-out people each piece of wording is tried on (default 40)")
    sub.add_argument("--seed", type=seed_number, default=0, help="seed of the held-out draw")


def run_wording(args: argparse.Namespace, model, tokenizer) -> int:
    from monitoring.reading import measure_reading
    from monitoring.retention import ProbedText

    rows = []
    for trial in rich_bios.wording_trials(args.people, args.seed):
        documents = [ProbedText(text, ((probe.question, probe.answer),))
                     for text, probe in zip(trial.texts, trial.probes, strict=True)]
        accuracy = measure_reading(model, tokenizer, documents, people=(1,))["rows"][0]["accuracy"]
        rows.append({"attribute": trial.attribute, "kind": trial.kind, "wording": trial.wording,
                     "value_first": trial.value_first, "accuracy": accuracy})
    result = {"model": str(args.model), "people": args.people, "seed": args.seed, "trials": rows,
              "summary": summarise(rows)}
    print(format_wording(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


SUMMARY_GROUPS = {
    "reference (training wording)": lambda row: row["kind"] == "reference",
    "held-out question phrasings": lambda row: row["kind"] == "question",
    "held-out templates, name first": lambda row: row["kind"] == "template" and not row["value_first"],
    "held-out templates, value first": lambda row: row["kind"] == "template" and row["value_first"],
}


def summarise(rows: list[dict]) -> dict[str, float | None]:
    """Mean accuracy of each kind of trial (SUMMARY_GROUPS); None for a kind without trials."""
    means: dict[str, float | None] = {}
    for group, belongs in SUMMARY_GROUPS.items():
        accuracies = [row["accuracy"] for row in rows if belongs(row)]
        means[group] = sum(accuracies) / len(accuracies) if accuracies else None
    return means


def format_wording(result: dict) -> str:
    """The trials as a text table, then the mean of each kind."""
    lines = [f"held-out wording, one piece at a time ({result['people']} held-out people, each alone in the "
             "prompt, pool off)", f"{'attribute':<11} {'accuracy':>8}  {'trial':<9} wording"]
    for row in result["trials"]:
        marker = "  [value first]" if row["value_first"] else ""
        lines.append(f"{row['attribute']:<11} {100 * row['accuracy']:>7.1f}%  {row['kind']:<9} "
                     f"{row['wording']}{marker}")
    lines.append("mean accuracy")
    for group, mean in result["summary"].items():
        lines.append(f"  {group:<33} {'-' if mean is None else f'{100 * mean:.1f}%'}")
    return "\n".join(lines)
