"""`ckl eval retention`: how well a MemoryLLM recalls injected documents, fresh and after later injections;
`ckl eval reading`: how well it reads documents in the prompt, the person asked about among others;
`ckl eval wording`: which held-out phrasings and templates it cannot read (cli/eval_wording.py).

Without --docs the probed documents are biographies of held-out people (names never seen in training):
--split heldout (default) draws them from synthetic/bios.py in the wording the committed default model
was trained on; heldout-names from the free-wording stream of synthetic/rich_bios.py in its training
wording; heldout-wording from that stream in sentence templates, question phrasings and names that never
occur in its training text. With --docs they are the documents of a JSONL file in the docs/design.md
format (those with probes are asked; the file's other documents are injected too, in file order). Either
way the later injections after the probed documents are further held-out biographies of the split. See
monitoring/retention.py for the protocol. Prints a table; writes JSON and a PNG plot on request.

With --spacing S every probed document is followed by S held-out filler paragraphs (later counts them):
with S >= max(later) no other document's facts come between a document and its questions, so the curve
shows forgetting without them (drops, and the survivors moving away from the question), and the gap to
the usual curve is what the other documents cost.

With --bank every injection is also appended to a real memory bank (a temporary directory) and each
probe is asked twice, from the pool alone and with the bank's entries retrieved for the question: the
two curves side by side. --later 200,1000 shows what the bank keeps long after the pool forgot.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from cli.argtypes import non_negative_int, positive_int, seed_number
from cli.eval_wording import THROUGH, format_wording, measure_wording
from cli.serve import add_retrieval_arguments
from compression.settings import RetrievalSettings, SlotFormat
from model import DEFAULT_CHECKPOINT
from synthetic import bios, filler, rich_bios

SPLITS = ("heldout", "heldout-names", "heldout-wording")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    evaluations = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    sub = evaluations.add_parser(
        "retention", help="exact-match recall right after injection and after n later injections",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_shared_arguments(sub)
    sub.add_argument("--docs", type=Path, default=None,
                     help="JSONL documents with probes (default: held-out people)")
    sub.add_argument("--people", type=positive_int, default=100,
                     help="held-out people probed without --docs (default 100)")
    sub.add_argument("--later", type=_later_list, default="0,1,5,10,20,50,100",
                     help="numbers of later injections to measure at (default 0,1,5,10,20,50,100)")
    sub.add_argument("--filler-docs", type=non_negative_int, default=50,
                     help="held-out filler paragraphs for the LM loss (default 50; 0 to skip)")
    sub.add_argument("--seed", type=seed_number, default=0, help="seed of the held-out draw and memory drops")
    sub.add_argument("--spacing", type=non_negative_int, default=0,
                     help="held-out filler paragraphs injected after each probed document (default 0)")
    bank = sub.add_argument_group("memory bank")
    bank.add_argument("--bank", action="store_true",
                      help="also answer with retrieval from a memory bank fed by the same injections")
    add_retrieval_arguments(bank)
    sub.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG here")

    reading = evaluations.add_parser(
        "reading", help="accuracy with biographies in the prompt (no memory), the person among others",
        description=READING_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_shared_arguments(reading)
    reading.add_argument("--documents", type=positive_int, default=64,
                         help="held-out biographies, grouped into prompts (default 64)")
    reading.add_argument("--people", type=_people_list, default="1,2,4,8",
                         help="people per prompt to measure at (default 1,2,4,8)")
    reading.add_argument("--seed", type=seed_number, default=0, help="seed of the held-out draw")

    wording = evaluations.add_parser(
        "wording", help="accuracy on each held-out question phrasing and sentence template alone",
        description=WORDING_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_shared_arguments(wording, splits=False)
    wording.add_argument("--people", type=positive_int, default=40,
                         help="held-out people each piece of wording is tried on (default 40)")
    wording.add_argument("--seed", type=seed_number, default=0, help="seed of the held-out draw")
    wording.add_argument("--through", choices=THROUGH, default="memory",
                         help="read each biography injected into memory (default, as the pipeline reads) "
                              "or in the prompt with the pool off")


def _add_shared_arguments(sub: argparse.ArgumentParser, splits: bool = True) -> None:
    """The arguments every evaluation takes: checkpoint, (held-out split,) device, JSON output."""
    sub.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT,
                     help="checkpoint directory (default model/default)")
    if splits:
        sub.add_argument("--split", choices=SPLITS, default="heldout",
                         help="held-out people of which stream and wording "
                              "(default heldout; the splits: `ckl eval retention -h`)")
    sub.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:0, ...")
    sub.add_argument("--json", type=Path, default=None, help="write the result as JSON here")


READING_DESCRIPTION = """\
Reading without memory: held-out biographies are put in the prompt, a few people at a time, and every
question about each of them is asked after them, with the model's pool switched off. With one person
this measures reading; with more it measures binding, finding the person asked about among others. A
model that reads values but not whose they are falls to 1/people of its one-person accuracy (the
"random pick" column), and its wrong answers are the values other people in the prompt state.
"""

WORDING_DESCRIPTION = """\
Each held-out piece of wording of the free-wording stream (synthetic/rich_bios.py) is tried alone:
plain biographies of held-out people in training wording, with only that phrasing asked or only that
template stating its attribute. Every trial of an attribute uses the same people and the same other
sentences as its reference trial (training wording only), so a trial's fall below the reference is that
piece's. The value-first templates of training wording are tried the same way: they tell whether a
held-out value-first template fails for its wording or for stating the value first. By default each
biography is injected into memory and its question asked right after (the fresh point of
`ckl eval retention`), as the pipeline reads; --through prompt puts each person alone in the prompt with
the pool switched off instead (as `ckl eval reading`). The two can differ: training's memory stage trains
reading through memory only.
"""


def run(args: argparse.Namespace) -> int:
    loaded = _load_checkpoint(args)
    if loaded is None:
        return 2
    if args.evaluation == "reading":
        return run_reading(args, *loaded)
    if args.evaluation == "wording":
        result = measure_wording(*loaded, args.people, args.seed, args.through)
        result["model"] = str(args.model)
        print(format_wording(result))
        _write_json(args.json, result)
        return 0
    return run_retention(args, *loaded)


def _load_checkpoint(args: argparse.Namespace) -> tuple | None:
    """(model, tokenizer) of --model on --device, in eval mode; None (after saying why) if it cannot load."""
    import torch

    from model import MemoryLLM
    from model.distributed import resolve_device
    from model.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
        model = MemoryLLM.from_pretrained(args.model, torch_dtype=torch.float32)
    except (FileNotFoundError, OSError) as error:
        print(f"ckl eval {args.evaluation}: cannot load a checkpoint from {args.model}: {error}",
              file=sys.stderr)
        return None
    return model.to(resolve_device(args.device)).eval(), tokenizer


def run_reading(args: argparse.Namespace, model, tokenizer) -> int:
    from monitoring.reading import format_reading, measure_reading
    from monitoring.retention import ProbedText

    documents = [ProbedText.of(d) for d in heldout_documents(args.split, args.documents, args.seed)]
    result = measure_reading(model, tokenizer, documents, args.people)
    result.update(model=str(args.model), split=args.split)
    print(format_reading(result))
    _write_json(args.json, result)
    return 0


def run_retention(args: argparse.Namespace, model, tokenizer) -> int:
    from documents.parse import InvalidDocument, parse_document
    from monitoring.answers import format_per_later, wrong_answer_kinds
    from monitoring.retention import ProbedText, format_table, measure_retention, plot_curve, spaced

    heldout = heldout_documents(args.split, args.people + max(args.later), args.seed)
    if args.docs is None:
        stream = [ProbedText.of(d) for d in heldout[: args.people]]
    else:
        try:
            lines = [line for line in args.docs.read_text(encoding="utf-8").splitlines() if line.strip()]
            stream = [ProbedText.of(parse_document(line.encode())) for line in lines]
        except (OSError, InvalidDocument) as error:
            print(f"ckl eval retention: {args.docs}: {error}", file=sys.stderr)
            return 2
        if not any(doc.probes for doc in stream):
            print(f"ckl eval retention: no document in {args.docs} carries probes", file=sys.stderr)
            return 2
    held_out_filler = [d.text for d in filler.filler_documents(
        args.filler_docs + args.spacing * sum(1 for doc in stream if doc.probes), "heldout", args.seed)]
    lm_texts = held_out_filler[: args.filler_docs]
    stream = spaced(stream, held_out_filler[args.filler_docs :], args.spacing)
    # later injections after the last probed document: other held-out people, never probed
    stream += [ProbedText(d.text, ()) for d in heldout[args.people :]]
    with tempfile.TemporaryDirectory(prefix="ckl-eval-bank-") as bank_dir:
        bank = None
        if args.bank:
            from compression.retrieval import StreamBank

            settings = RetrievalSettings(top_k=args.top_k, token_budget=args.top_k * model.config.num_tokens,
                                         keys=args.keys)
            bank = StreamBank(model, bank_dir, settings, SlotFormat(args.slots, args.slot_dtype))
        result = measure_retention(model, tokenizer, stream, args.later, lm_texts, args.seed, bank)
    result.update(model=str(args.model), docs=str(args.docs) if args.docs else f"{args.split} people",
                  spacing=args.spacing)
    if args.bank:
        result["bank"] = {"top_k": args.top_k, "keys": args.keys,
                          "slots": args.slots or model.config.num_tokens, "slot_dtype": args.slot_dtype}
    result["by_attribute"] = accuracy_by_attribute(result["answers"])
    result["wrong_answers"] = wrong_answer_kinds(result["answers"])
    print(format_table(result))
    if result["by_attribute"]:
        print(format_per_later("by attribute", result["by_attribute"]))
    if result["wrong_answers"]:
        print(format_per_later("wrong answers", result["wrong_answers"]))
    _write_json(args.json, result)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_curve(result, args.plot)
    return 0


def _write_json(path: Path | None, result: dict) -> None:
    """The result as indented JSON at `path` (if one was asked for)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def accuracy_by_attribute(answers: list[dict]) -> dict[str, dict[int, float]]:
    """Exact match per attribute (known from the answer's value pool) and number of later injections."""
    from model.prompts import answers_match

    hits: dict[str, dict[int, list[bool]]] = {}
    for record in answers:
        attribute = bios.attribute_of(record["answer"])
        if attribute is not None:
            per_later = hits.setdefault(attribute, {})
            per_later.setdefault(record["later"], []).append(answers_match(record["said"], record["answer"]))
    return {attribute: {n: sum(h) / len(h) for n, h in sorted(per_later.items())}
            for attribute, per_later in sorted(hits.items(), key=lambda item: bios.ATTRIBUTES.index(item[0]))}


def heldout_documents(split: str, n: int, seed: int) -> list:
    """The first n held-out biographies of a split (one of SPLITS), as documents with probes."""
    if split == "heldout":
        return list(bios.bio_documents(n, "heldout", seed))
    return list(rich_bios.bio_documents(n, split, seed))


def _later_list(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values or values[0] < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _people_list(text: str) -> list[int]:
    values = _later_list(text)
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
