"""`ckl serve`: run the model server (FastAPI on uvicorn) that owns the live model and memory state.

On start it loads the checkpoint, restores the newest valid snapshot (refusing corrupt ones), binds the
port and writes `<state dir>/server.json` ({"pid", "url", ...}) so other commands can find it. Writes
need the token in CKL_WRITE_TOKEN; without it the server answers queries but refuses writes.
`ckl serve --stop` stops the server that server.json names.
"""

import argparse
import json
import logging
import os
import socket
from pathlib import Path

from serving.settings import DEFAULT_CHECKPOINT

DEFAULT_PORT = 8400
DTYPES = ("auto", "float32", "bfloat16", "float16")

log = logging.getLogger("ckl.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port, 0 for any free one (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"checkpoint directory (default: the committed {DEFAULT_CHECKPOINT})")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="snapshot directory (default: .ckl/snapshots)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (default: the checkpoint's)")
    parser.add_argument("--context-tokens", type=int, default=None,
                        help="most tokens per injected context (default: the checkpoint's window)")
    parser.add_argument("--stop", action="store_true",
                        help="stop the server this state dir's server.json names, and exit")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.paths import cache_dir, state_dir

    if args.stop:
        from serving.process import stop_running_server

        stopped = stop_running_server(state_dir())
        print("model server stopped" if stopped else "no model server running")
        return 0

    import uvicorn

    from serving.app import create_app
    from serving.client import SERVER_FILE
    from serving.metrics import ServerMetrics
    from serving.runner import ModelRunner
    from serving.settings import WRITE_TOKEN_ENV, ServerSettings
    from serving.state import LiveState, NoValidSnapshot

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
    )
    if settings.write_token is None:
        log.warning("%s is not set: writes (inject, snapshot) will be refused", WRITE_TOKEN_ENV)

    runner = ModelRunner(settings.checkpoint, settings.device, settings.dtype, settings.cache_dir)
    state = LiveState(runner, settings.snapshot_root, settings.context_tokens)
    try:
        restored = state.restore()
    except NoValidSnapshot as error:
        log.error("%s", error)
        return 1
    if restored is None:
        log.info("no snapshot in %s: starting from the checkpoint's memory", settings.snapshot_root)
    metrics = ServerMetrics()
    metrics.set_memory_version(state.view().memory_version)
    server_file = state_dir() / SERVER_FILE
    app = create_app(state, settings, metrics, on_shutdown=lambda: _remove_server_file(server_file))

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    url = f"http://{args.host}:{sock.getsockname()[1]}"
    _write_server_file(server_file, {"pid": os.getpid(), "url": url, "checkpoint": str(settings.checkpoint),
                                     "snapshots": str(settings.snapshot_root)})
    log.info("serving %s at %s (API docs: %s/docs)", settings.checkpoint, url, url)
    uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False)).run(sockets=[sock])
    return 0


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
