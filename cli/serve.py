"""`ckl serve`: run the model server (FastAPI on uvicorn) that owns the live model and memory state.

On start it loads the checkpoint, restores the newest valid snapshot (refusing corrupt ones), binds the
port and writes `<state dir>/server.json` ({"pid", "url", ...}) so other commands can find it. Writes
need the token in CKL_WRITE_TOKEN; without it the server answers queries but refuses writes.
`ckl serve --stop` stops the server that server.json names. Numeric flags are checked when parsed
(cli/argtypes.py): an impossible value exits with code 2 before anything is loaded.
"""

import argparse
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

from cli.argtypes import non_negative_int, port_number, positive_float, positive_int
from compression.settings import KEY_KINDS, SLOT_DTYPES, RetrievalSettings, SlotFormat
from model import DEFAULT_CHECKPOINT
from serving.settings import DEFAULT_MAX_WAITING_QUERIES
from serving.snapshots import CheckpointPolicy

DEFAULT_PORT = 8400
DTYPES = ("auto", "float32", "bfloat16", "float16")

log = logging.getLogger("ckl.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    retrieval, checkpoints = RetrievalSettings(), CheckpointPolicy()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help="port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint directory (default: the committed {DEFAULT_CHECKPOINT})")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="snapshot directory (default: .ckl/snapshots)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (default: the checkpoint's)")
    parser.add_argument("--context-tokens", type=positive_int, default=None,
                        help="most tokens per injected context, 1 to the checkpoint's window (default: the "
                             "window)")
    bank = parser.add_argument_group("memory bank and retrieval")
    bank.add_argument("--bank", default=None,
                      help="memory bank location, a path or object-store URI (default: .ckl/bank)")
    bank.add_argument("--no-retrieval", action="store_true",
                      help="answer from the pool alone unless a query asks for retrieval")
    add_retrieval_arguments(bank)
    bank.add_argument("--retrieval-budget", type=positive_int, default=retrieval.token_budget,
                      help="most retrieved tokens per layer per question (default: %(default)s)")
    bank.add_argument("--checkpoint-every", type=positive_int, default=checkpoints.every_batches,
                      metavar="BATCHES",
                      help="write a full pool checkpoint every this many batches (default: %(default)s)")
    bank.add_argument("--checkpoint-every-s", type=positive_float, default=checkpoints.every_s,
                      metavar="SECONDS",
                      help="... or after this many seconds, whichever comes first (default: %(default)g)")
    parser.add_argument("--max-waiting-queries", type=non_negative_int, default=DEFAULT_MAX_WAITING_QUERIES,
                        metavar="N",
                        help="most queries waiting for the model; one more gets 503 with Retry-After, "
                             "about as long as recent queries took to be answered (0: none wait, a query "
                             "arriving while another is answered is refused; writes are never refused for "
                             "it; default: %(default)s)")
    parser.add_argument("--follow", type=positive_float, default=None, metavar="SECONDS",
                        help="run as a read replica of the writer whose --snapshots and --bank it shares: "
                             "refuse writes, catch up with its checkpoints and bank every SECONDS")
    parser.add_argument("--stop", action="store_true",
                        help="stop the server this state dir's server.json names, and exit")


def add_retrieval_arguments(group: argparse._ArgumentGroup) -> None:
    """--top-k, --keys, --slots and --slot-dtype, with the settings' defaults and choices (ckl serve and
    ckl eval retention both take them)."""
    retrieval, slot_format = RetrievalSettings(), SlotFormat()
    group.add_argument("--top-k", type=positive_int, default=retrieval.top_k,
                       help="most bank entries per question (default: %(default)s; see docs/bank.md)")
    group.add_argument("--keys", choices=KEY_KINDS, default=retrieval.keys,
                       help="retrieval key index (default: %(default)s)")
    group.add_argument("--slots", type=positive_int, default=slot_format.slots,
                       help="retrieval slots kept per layer and entry (default: all K)")
    group.add_argument("--slot-dtype", choices=SLOT_DTYPES, default=slot_format.dtype,
                       help="dtype of the retrieval slots (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from runtime.paths import cache_dir, state_dir

    if args.stop:
        from serving.process import stop_running_server

        stopped = stop_running_server(state_dir())
        print("model server stopped" if stopped else "no model server running")
        return 0

    import uvicorn

    from compression.bank import BankError
    from serving.app import create_app
    from serving.client import SERVER_FILE
    from serving.metrics import ServerMetrics
    from serving.runner import ModelRunner
    from serving.settings import WRITE_TOKEN_ENV, ServerSettings
    from serving.state import LiveState, NoValidSnapshot, open_bank

    checkpoint = args.model or DEFAULT_CHECKPOINT
    if not (checkpoint / "config.json").is_file():
        hint = "" if args.model else " (the default model is not there yet: pass --model PATH)"
        log.error("no model checkpoint at %s%s", checkpoint, hint)
        return 2
    settings = ServerSettings.from_environment(
        checkpoint=checkpoint.resolve(),
        snapshot_root=(args.snapshots or state_dir() / "snapshots").resolve(),
        device=args.device,
        dtype=args.dtype,
        context_tokens=args.context_tokens,
        cache_dir=cache_dir(),
        bank_uri=args.bank,
        retrieval=RetrievalSettings(not args.no_retrieval, args.top_k, args.retrieval_budget, args.keys),
        slot_format=SlotFormat(args.slots, args.slot_dtype),
        checkpoints=CheckpointPolicy(args.checkpoint_every, args.checkpoint_every_s),
        max_waiting_queries=args.max_waiting_queries,
        follow_s=args.follow,
    )
    if settings.follow_s is not None:
        log.info("read replica: catching up with the writer every %.1f s; writes are refused",
                 settings.follow_s)
    elif settings.write_token is None:
        log.warning("%s is not set: writes (inject, snapshot) will be refused", WRITE_TOKEN_ENV)

    runner = ModelRunner(settings.checkpoint, settings.device, settings.dtype, settings.cache_dir)
    try:
        bank, retriever = open_bank(runner, settings.bank, settings.slot_format, settings.retrieval)
    except BankError as error:
        log.error("%s", error)
        return 1
    state = LiveState(runner, settings.snapshot_root, bank, retriever, settings.context_tokens,
                      settings.checkpoints)
    try:
        restored = state.restore()
    except (NoValidSnapshot, BankError) as error:
        log.error("%s", error)
        return 1
    if restored is None:
        log.info("no snapshot in %s: starting from the checkpoint's memory", settings.snapshot_root)
    metrics = ServerMetrics()
    metrics.set_memory_version(state.view().memory_version)
    if settings.follow_s is not None:
        threading.Thread(target=_follow, args=(state, metrics, settings.follow_s), daemon=True,
                         name="follow").start()
    server_file = state_dir() / SERVER_FILE
    app = create_app(state, settings, metrics, on_shutdown=lambda: _remove_server_file(server_file))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    _write_server_file(server_file, {"pid": os.getpid(), "url": url, "checkpoint": str(settings.checkpoint),
                                     "snapshots": str(settings.snapshot_root),
                                     "bank": settings.bank})
    log.info("serving %s at %s (API docs: %s/docs)", settings.checkpoint, url, url)
    uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
    return 0


def _follow(state, metrics, interval_s: float) -> None:
    """A read replica's loop: catch up with the writer every `interval_s` seconds, for ever."""
    while True:
        time.sleep(interval_s)
        try:
            if state.follow():
                metrics.set_memory_version(state.view().memory_version)
        except Exception:  # a writer mid-rollback or a storage hiccup: try again next time
            log.exception("replica: catching up failed; retrying in %.1f s", interval_s)


def _write_server_file(path: Path, info: dict) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(temp, path)


def _remove_server_file(path: Path) -> None:
    """Remove server.json if it still describes this process (a newer server may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
