"""The question/answer text format shared by training, evaluation and serving.

A trained model answers a question asked as `format_question(q)`; its answer is the generated text up to
the first newline. Keep these in one place: a checkpoint only answers well in the format it was trained on.
"""

QUESTION_PREFIX = "Q: "
ANSWER_PREFIX = "\nA:"


def format_question(question: str) -> str:
    """The prompt for a question, ending where the answer begins."""
    return f"{QUESTION_PREFIX}{question.strip()}{ANSWER_PREFIX}"


def format_qa(question: str, answer: str) -> str:
    """A question with its answer, as the model sees it in training (answer ends with a newline)."""
    return f"{format_question(question)} {answer.strip()}\n"


def extract_answer(generated: str) -> str:
    """The answer part of generated text: up to the first newline, stripped."""
    return generated.split("\n", 1)[0].strip()


def normalise_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, single spaces, no surrounding dots."""
    return " ".join(text.strip().strip(".").lower().split())


def answers_match(predicted: str, truth: str) -> bool:
    """Exact match after normalising case and surrounding whitespace/punctuation."""
    return normalise_answer(predicted) == normalise_answer(truth)
