"""`ckl eval wording`: each held-out question phrasing and sentence template tried alone (the trials of
`rich_bios.wording_trials`), with the value-first training templates as a control, read through memory (the
fresh point of `ckl eval retention`) or in the prompt (as `ckl eval reading` reads one person), and the mean
of each kind."""

from synthetic import rich_bios

THROUGH = ("memory", "prompt")  # how a trial's biographies reach the model
SUMMARY_GROUPS = {
    "reference (training wording)": lambda row: row["kind"] == "reference",
    "held-out question phrasings": lambda row: row["kind"] == "question",
    "held-out templates, name first": lambda row: row["kind"] == "template" and not row["value_first"],
    "held-out templates, value first": lambda row: row["kind"] == "template" and row["value_first"],
    "training templates, value first": lambda row: row["kind"] == "training template",
}


def measure_wording(model, tokenizer, people: int, seed: int, through: str = "memory") -> dict:
    """Accuracy of every trial over `people` held-out people, and the summary, as a JSON-able dict.

    through "memory": the trial's biographies are injected one after another, each asked right after its
    injection; "prompt": each biography alone in the prompt, the pool switched off."""
    from monitoring.reading import measure_reading
    from monitoring.retention import ProbedText, measure_retention

    if through not in THROUGH:
        raise ValueError(f"through must be one of {THROUGH}, not {through!r}")
    rows = []
    for trial in rich_bios.wording_trials(people, seed):
        documents = [ProbedText(text, ((probe.question, probe.answer),))
                     for text, probe in zip(trial.texts, trial.probes, strict=True)]
        if through == "memory":
            accuracy = measure_retention(model, tokenizer, documents, later=(0,), seed=seed, progress=False,
                                         baseline=False)["fresh_accuracy"]
        else:
            accuracy = measure_reading(model, tokenizer, documents, people=(1,))["rows"][0]["accuracy"]
        rows.append({"attribute": trial.attribute, "kind": trial.kind, "wording": trial.wording,
                     "value_first": trial.value_first, "accuracy": accuracy})
    return {"people": people, "seed": seed, "through": through, "trials": rows, "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict[str, float | None]:
    """Mean accuracy of each kind of trial (SUMMARY_GROUPS); None for a kind without trials."""
    means: dict[str, float | None] = {}
    for group, belongs in SUMMARY_GROUPS.items():
        accuracies = [row["accuracy"] for row in rows if belongs(row)]
        means[group] = sum(accuracies) / len(accuracies) if accuracies else None
    return means


def format_wording(result: dict) -> str:
    """The trials as a text table, then the mean of each kind."""
    how = ("each injected into memory, asked right after" if result["through"] == "memory"
           else "each alone in the prompt, pool off")
    lines = [f"wording, one piece at a time ({result['people']} held-out people, {how})",
             f"{'attribute':<11} {'accuracy':>8}  {'trial':<17} wording"]
    for row in result["trials"]:
        marker = "  [value first]" if row["value_first"] else ""
        lines.append(f"{row['attribute']:<11} {100 * row['accuracy']:>7.1f}%  {row['kind']:<17} "
                     f"{row['wording']}{marker}")
    lines.append("mean accuracy")
    for group, mean in result["summary"].items():
        lines.append(f"  {group:<33} {'-' if mean is None else f'{100 * mean:.1f}%'}")
    return "\n".join(lines)
