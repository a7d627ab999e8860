"""`ckl eval wording`: each held-out question phrasing and sentence template tried alone (the trials of
`rich_bios.wording_trials`, read as `ckl eval reading` reads one person), and the mean of each kind."""

from synthetic import rich_bios

SUMMARY_GROUPS = {
    "reference (training wording)": lambda row: row["kind"] == "reference",
    "held-out question phrasings": lambda row: row["kind"] == "question",
    "held-out templates, name first": lambda row: row["kind"] == "template" and not row["value_first"],
    "held-out templates, value first": lambda row: row["kind"] == "template" and row["value_first"],
}


def measure_wording(model, tokenizer, people: int, seed: int) -> dict:
    """Accuracy of every trial over `people` held-out people, and the summary, as a JSON-able dict."""
    from monitoring.reading import measure_reading
    from monitoring.retention import ProbedText

    rows = []
    for trial in rich_bios.wording_trials(people, seed):
        documents = [ProbedText(text, ((probe.question, probe.answer),))
                     for text, probe in zip(trial.texts, trial.probes, strict=True)]
        accuracy = measure_reading(model, tokenizer, documents, people=(1,))["rows"][0]["accuracy"]
        rows.append({"attribute": trial.attribute, "kind": trial.kind, "wording": trial.wording,
                     "value_first": trial.value_first, "accuracy": accuracy})
    return {"people": people, "seed": seed, "trials": rows, "summary": summarise(rows)}


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
