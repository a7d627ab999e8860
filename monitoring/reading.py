"""Reading without memory: biographies in the prompt, the person asked about among others.

Separates what a checkpoint can read from what its memory keeps. The documents are laid out as training's
reader rows lay them out (each text and a newline), groups of `people` consecutive documents at a time,
and every probe of every document in the group is asked right after the group's text, with the model's
pool switched off (an uninitialised pool takes no part in a query). Accuracy with one person in the
prompt is reading; its fall with more people is binding: a model that finds a value of the asked kind
but not the person's answers with 1/people of its one-person accuracy, and its wrong answers are the
values that other people in the prompt state ("others' values").
"""

from collections.abc import Sequence

from model.memory_pool import MemoryState
from model.prompts import answers_match
from monitoring.retention import ProbedText, QueryRunner

DEFAULT_PEOPLE = (1, 2, 4, 8)


def measure_reading(model, tokenizer, documents: Sequence[ProbedText],
                    people: Sequence[int] = DEFAULT_PEOPLE) -> dict:
    """Exact-match accuracy per number of people in the prompt, and the share of wrong answers that are
    another person's value (see the module docstring), as a JSON-able dict."""
    documents = [doc for doc in documents if doc.probes]
    if not documents:
        raise ValueError("no document carries probes")
    runner = QueryRunner(model, tokenizer)
    max_new_tokens = max(len(runner.encode(" " + a)) for doc in documents for _, a in doc.probes) + 2
    saved = model.memory_state()
    model.set_memory_state(MemoryState(saved.pool, 0, 0, False))  # no pool in front of the prompt
    rows = []
    try:
        for count in sorted(set(people)):
            hits, others = [], []
            for start in range(0, len(documents) - count + 1, count):
                group = documents[start : start + count]
                asked = [(index, q, truth) for index, doc in enumerate(group) for q, truth in doc.probes]
                context = "".join(doc.text + "\n" for doc in group)
                said = runner.answer([q for _, q, _ in asked], max_new_tokens, context=context)
                for answer, (index, _, truth) in zip(said, asked, strict=True):
                    hits.append(answers_match(answer, truth))
                    if not hits[-1]:
                        stated_by = {i for i, _, value in asked if answers_match(answer, value)}
                        others.append(bool(stated_by - {index}))
            rows.append({"people": count, "questions": len(hits),
                         "accuracy": sum(hits) / len(hits) if hits else None,
                         "wrong_from_others": sum(others) / len(others) if others and count > 1 else None})
    finally:
        model.set_memory_state(saved)
    return {"documents": len(documents), "rows": rows}


def format_reading(result: dict) -> str:
    """The result as a text table."""
    lines = [f"reading without memory ({result['documents']} documents)",
             f"{'people':>6} {'accuracy':>9} {'random pick':>12} {'wrong: others':>14} {'questions':>9}"]
    alone = result["rows"][0]["accuracy"] if result["rows"][0]["people"] == 1 else None
    for row in result["rows"]:
        pick = "-" if alone is None else f"{100 * alone / row['people']:.1f}%"
        others = "-" if row["wrong_from_others"] is None else f"{100 * row['wrong_from_others']:.1f}%"
        accuracy = "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
        lines.append(f"{row['people']:>6} {accuracy:>9} {pick:>12} {others:>14} {row['questions']:>9}")
    return "\n".join(lines)
