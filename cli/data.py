"""`ckl data`: generate the project's training and evaluation data.

`ckl data bios --out DIR` writes, deterministically from `--seed`:
- DIR/train.jsonl: biographies of training people, one document per person with one probe per attribute;
- DIR/heldout.jsonl: biographies of held-out people, whose first and last names never occur in training;
  with `--stream rich` (the free-wording stream of synthetic/rich_bios.py) two files instead:
  DIR/heldout_names.jsonl (held-out people in training wording) and DIR/heldout_wording.jsonl (held-out
  people in sentence templates and question phrasings that never occur in training);
- DIR/filler_train.jsonl, DIR/filler_heldout.jsonl: plain language-modelling text (source "filler");
- DIR/manifest.json: counts, seed, pool sizes and each file's SHA-256.
All documents follow the message format of docs/design.md, so they can be published with `ckl produce`.
"""

import argparse
import hashlib
import json
import time
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from cli.argtypes import non_negative_int, seed_number
from documents.model import Document
from synthetic import bios, filler, rich_bios


def add_arguments(parser: argparse.ArgumentParser) -> None:
    datasets = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    sub = datasets.add_parser(
        "bios",
        help="fictional biographies with probes, held-out people, and filler text (JSONL)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    sub.add_argument("--train-people", type=non_negative_int, default=10_000,
                     help="training people (default 10000)")
    sub.add_argument("--heldout-people", type=non_negative_int, default=1_000,
                     help="held-out people, with names never seen in training (default 1000)")
    sub.add_argument("--filler-docs", type=non_negative_int, default=5_000,
                     help="training filler paragraphs (default 5000)")
    sub.add_argument("--heldout-filler-docs", type=non_negative_int, default=None,
                     help="held-out filler paragraphs (default: a tenth of --filler-docs)")
    sub.add_argument("--stream", choices=("bios", "rich"), default="bios",
                     help="bios: the committed model's six templates per attribute (default); rich: free "
                          "wording with held-out wording")
    sub.add_argument("--seed", type=seed_number, default=0,
                     help="seed for people, texts and filler (default 0)")


def run(args: argparse.Namespace) -> int:
    heldout_filler = args.filler_docs // 10 if args.heldout_filler_docs is None else args.heldout_filler_docs
    started = time.perf_counter()
    try:
        manifest = write_bios_dataset(args.out, args.train_people, args.heldout_people, args.filler_docs,
                                      heldout_filler, args.seed, args.stream)
    except ValueError as error:
        print(f"ckl data bios: {error}")
        return 2
    counts = ", ".join(f"{name}: {entry['documents']}" for name, entry in manifest["files"].items())
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s ({counts})")
    return 0


def write_bios_dataset(out_dir: Path, train_people: int, heldout_people: int, filler_docs: int,
                       heldout_filler_docs: int, seed: int, stream: str = "bios") -> dict:
    """Write the JSONL files and manifest.json into out_dir; returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if stream == "bios":
        outputs = {
            "train.jsonl": (bios.bio_documents(train_people, "train", seed), train_people),
            "heldout.jsonl": (bios.bio_documents(heldout_people, "heldout", seed), heldout_people),
        }
    else:
        outputs = {
            "train.jsonl": (rich_bios.bio_documents(train_people, "train", seed), train_people),
            **{f"{split.replace('-', '_')}.jsonl": (rich_bios.bio_documents(heldout_people, split, seed),
                                                    heldout_people) for split in rich_bios.SPLITS[1:]},
        }
    outputs |= {
        "filler_train.jsonl": (filler.filler_documents(filler_docs, "train", seed), filler_docs),
        "filler_heldout.jsonl": (filler.filler_documents(heldout_filler_docs, "heldout", seed),
                                 heldout_filler_docs),
    }
    files = {name: _write_jsonl(out_dir / name, docs, total) for name, (docs, total) in outputs.items()}
    manifest = {
        "generator": "ckl data bios",
        "stream": stream,
        "seed": seed,
        "files": files,
        "name_pools": {split: _name_pool_sizes(split) for split in bios.SPLITS},
        "attribute_pools": {
            "birth_date": f"{bios.FIRST_BIRTH_DATE} to {bios.LAST_BIRTH_DATE}",
            "birth_city": len(bios.CITIES),
            "university": len(bios.UNIVERSITIES),
            "major": len(bios.MAJORS),
            "employer": len(bios.EMPLOYERS),
        },
        "attribute_pools_shared_between_splits": True,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _write_jsonl(path: Path, documents: Iterable[Document], total: int) -> dict:
    """Write one document per line (via a temporary file, so a failed run leaves no partial file)."""
    digest = hashlib.sha256()
    count = 0
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for document in tqdm(documents, total=total, desc=path.name, unit="doc", disable=total < 10_000):
            line = document.to_json() + "\n"
            out.write(line)
            digest.update(line.encode("utf-8"))
            count += 1
    partial.replace(path)
    return {"documents": count, "sha256": digest.hexdigest()}


def _name_pool_sizes(split: str) -> dict[str, int]:
    first_names, last_names = bios.name_pools(split)
    return {"first_names": len(first_names), "last_names": len(last_names)}
