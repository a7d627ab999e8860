"""Error analysis of the answers `measure_retention` records: where the wrong answers come from, per
number of later injections, and a text table of such shares."""

from model.prompts import answers_match, normalise_answer

WRONG_ANSWER_KINDS = ("another document's", "own, other question", "nobody's")


def wrong_answer_kinds(answers: list[dict]) -> dict[str, dict[int, float]]:
    """Where the wrong answers come from, as shares of the wrong answers per number of later injections:
    a value another asked document states (the model read the wrong document), a value its own document
    states for another question (the wrong attribute), or neither (a value it was not shown)."""
    documents_stating: dict[str, set[int]] = {}
    for record in answers:
        documents_stating.setdefault(normalise_answer(record["answer"]), set()).add(record["document"])
    counts: dict[int, dict[str, int]] = {}
    for record in answers:
        if answers_match(record["said"], record["answer"]):
            continue
        stated_by = documents_stating.get(normalise_answer(record["said"]), set())
        if stated_by - {record["document"]}:
            kind = WRONG_ANSWER_KINDS[0]
        elif stated_by:
            kind = WRONG_ANSWER_KINDS[1]
        else:
            kind = WRONG_ANSWER_KINDS[2]
        per_kind = counts.setdefault(record["later"], dict.fromkeys(WRONG_ANSWER_KINDS, 0))
        per_kind[kind] += 1
    return {kind: {n: per_kind[kind] / sum(per_kind.values()) for n, per_kind in sorted(counts.items())}
            for kind in WRONG_ANSWER_KINDS} if counts else {}


def format_per_later(title: str, table: dict[str, dict[int, float]]) -> str:
    """Shares per row label as a text table, a column per number of later injections."""
    later = sorted({n for per_later in table.values() for n in per_later})
    width = max(len(title), *(len(label) for label in table))
    lines = [f"{title:<{width}} " + " ".join(f"{f'later {n}':>9}" for n in later)]
    for label, per_later in table.items():
        cells = (f"{100 * per_later[n]:8.1f}%" if n in per_later else f"{'-':>9}" for n in later)
        lines.append(f"{label:<{width}} " + " ".join(cells))
    return "\n".join(lines)
