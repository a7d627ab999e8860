"""`ckl bank ls|show|stats`: what the memory bank holds, since when, from which source.

Reads the bank directly (read-only; safe while the server appends: every read sees one committed
version). The bank is `.ckl/bank` unless --bank names another path or object-store URI.
"""

import argparse
import json
import sys

from cli.argtypes import non_negative_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bank", default=None, help="bank path or URI (default: .ckl/bank)")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = actions.add_parser("ls", help="list entries, newest first",
                            description="List bank entries, newest first (one line per injected context).")
    ls.add_argument("--source", default=None, help="only entries from this source")
    ls.add_argument("--since", default=None, metavar="ISO-8601",
                    help="only entries appended at or after this UTC time (e.g. 2026-12-01T00:00)")
    ls.add_argument("--limit", type=non_negative_int, default=20,
                    help="most entries to print (default 20; 0: all)")
    ls.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    show = actions.add_parser("show", help="one document's entries: text, probes, Kafka position",
                              description="Show every entry of one document.")
    show.add_argument("doc_id")
    stats = actions.add_parser("stats", help="entries, documents, sources, time span, bytes on disk",
                               description="Summary of the bank: counts, sources, time span, bytes.")
    stats.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from compression.bank import BankError, MemoryBank
    from runtime.paths import state_dir

    uri = args.bank or str(state_dir() / "bank")
    try:
        bank = MemoryBank(uri)
    except BankError as error:
        print(f"ckl bank: {error}", file=sys.stderr)
        return 2
    if args.action == "ls":
        return _ls(bank, args)
    if args.action == "show":
        return _show(bank, args.doc_id)
    return _stats(bank, args.json)


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ls(bank, args: argparse.Namespace) -> int:
    conditions = []
    if args.source:
        conditions.append(f"source = {_sql_string(args.source)}")
    if args.since:
        conditions.append(f"created_at >= TIMESTAMP {_sql_string(args.since.replace('T', ' '))}")
    rows = bank.infos(where=" AND ".join(conditions) or None)[::-1]
    shown = rows if args.limit == 0 else rows[: args.limit]
    if args.json:
        for row in shown:
            print(json.dumps(row, default=str))
        return 0
    print(f"{'seq':>7}  {'version':>7}  {'created (UTC)':19}  {'source':14}  {'kafka':16}  doc_id")
    for row in shown:
        kafka = f"{row['partition']}@{row['offset']}" if row["offset"] is not None else "-"
        chunk = f" #{row['chunk']}" if row["chunk"] else ""
        print(f"{row['seq']:>7}  {row['version']:>7}  {row['created_at']:%Y-%m-%d %H:%M:%S}  "
              f"{(row['source'] or '-')[:14]:14}  {kafka:16}  {row['doc_id']}{chunk}")
    print(f"{len(shown)} of {len(rows)} matching entries ({len(bank)} in the bank)")
    return 0


def _show(bank, doc_id: str) -> int:
    rows = bank.infos(where=f"doc_id = {_sql_string(doc_id)}")
    if not rows:
        print(f"ckl bank: no document {doc_id!r} in {bank.uri}", file=sys.stderr)
        return 1
    for row in rows:
        print(f"doc_id {row['doc_id']}  chunk {row['chunk']}  seq {row['seq']}  "
              f"memory version {row['version']}")
        print(f"  appended {row['created_at']:%Y-%m-%d %H:%M:%S} UTC, source {row['source'] or '-'}, "
              f"published {row['published_at'] or '-'}")
        if row["topic"] is not None:
            print(f"  kafka {row['topic']} partition {row['partition']} offset {row['offset']}")
        print(f"  text: {row['text']}")
        for probe in row["probes"]:
            print(f"  probe: {probe['question']} -> {probe['answer']}")
    return 0


def _stats(bank, as_json: bool) -> int:
    stats = bank.stats()
    if as_json:
        print(json.dumps(stats, default=str, indent=1))
        return 0
    layout = stats["layout"]
    print(f"bank {stats['uri']}")
    print(f"  {stats['entries']} entries, {stats['documents']} documents, {stats['memory_versions']} "
          f"memory versions (Lance version {stats['lance_version']})")
    if stats["entries"]:
        print(f"  appended from {stats['first_entry_at']:%Y-%m-%d %H:%M:%S} to "
              f"{stats['last_entry_at']:%Y-%m-%d %H:%M:%S} UTC")
    print("  sources: " + (", ".join(f"{name} ({count})" for name, count in stats["sources"].items()) or "-"))
    print(f"  entry layout: {layout['layers']} layers x {layout['tokens']} tokens x {layout['hidden']} "
          f"({layout['pool_dtype']}), retrieval slots {layout['slots']} per layer ({layout['slot_dtype']})")
    if stats["bytes_on_disk"] is not None:
        per_entry = stats["bytes_on_disk"] / max(1, stats["entries"])
        print(f"  on disk: {stats['bytes_on_disk'] / 2**20:.1f} MiB ({per_entry / 1024:.0f} KiB per entry)")
    return 0
