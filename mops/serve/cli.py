"""``mops-serve``: a pruned base (and a MoPs adapter) behind an OpenAI-compatible HTTP API.

    mops-serve --base runs/demo/pruned/sparsegpt-2of4 --adapter runs/demo/adapters/sparsegpt-2of4-mops --port 8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true`` for
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
Without ``--adapter`` the base is served as it is (no prompt, no gate).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from mops.cli_common import run_cli, setup_logging
from mops.errors import UserError

log = logging.getLogger("mops.serve")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in one line on stderr and exit code 2 (through ``run_cli``), like every other bad input."""

    def error(self, message):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="mops-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True,
                   help="the (pruned) base: a checkpoint folder, a .gguf file, or smollm2-135m")
    p.add_argument("--adapter", help="a MoPs adapter folder from mops-recover, trained on this base "
                   "(refused on any other, by weights hash); without it the base is served alone")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", default="8000", help="TCP port, 1-65535 (default: 8000)")
    p.add_argument("--model-name", help="the name clients send as `model` (default: the adapter's folder name, "
                   "else the base's)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together per step (default: 16); "
                   "1 serves one request at a time")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row (default: 64); "
                   "past it a request gets 503 with Retry-After")
    p.add_argument("--max-context", type=int, default=2048, help="prompt + completion tokens per request "
                   "(default: 2048, or less if the model's positions end sooner); bounds the KV memory")
    p.add_argument("--threads", type=int, help="CPU threads for the model (default: torch's)")
    p.add_argument("--retry-after", type=int, default=1, help="seconds a 503 tells the client to wait (default: 1)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="warnings only (no access log)")
    return p


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise UserError(f"--port {text!r}: expected a TCP port number in 1-65535")
    return port


def check_limits(args) -> None:
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-context", args.max_context, 2), ("--retry-after", args.retry_after, 1),
                             ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: expected {low} or more")


def check_address(host: str, port: int) -> None:
    """Refuse, before loading anything, an address this process cannot listen on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise UserError(f"--port {port} on {host}: cannot listen there ({e.strerror}); "
                            "choose a free port") from None


def load_for_serving(base: str, adapter: str | None, dtype: str = "float32", device: str = "cpu"):
    """(PromptedLM, tokenizer, fingerprint): the adapter on its base, or the base with no prompt."""
    from mops.adapter import load, read_adapter_config
    from mops.injection import PromptedLM
    from mops.models import load_model

    model, tokenizer = load_model(base, dtype=dtype, device=device)
    if adapter is None:
        # No prompt positions, no gate: the base model's own computation (mops.injection, m = 0).
        return PromptedLM.bare(model).eval(), tokenizer, "mops-base"
    lm = load(model, adapter)  # refuses an adapter trained on another base (weights hash)
    return lm, tokenizer, f"mops-{read_adapter_config(adapter)['base_weights_sha256'][:12]}"


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    port = parse_port(args.port)
    check_limits(args)
    setup_logging(args.quiet)
    check_address(args.host, port)

    import uvicorn

    from mops.serve.app import build_app
    from mops.serve.engine import Engine

    lm, tokenizer, fingerprint = load_for_serving(args.base, args.adapter, args.dtype, args.device)
    name = args.model_name or Path(args.adapter or args.base).name
    engine = Engine(lm, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                    threads=args.threads).start()
    app = build_app(engine, name, fingerprint=fingerprint, retry_after=args.retry_after)
    log.info("serving %r on http://%s:%d (batch %d, queue %d, context %d)", name, args.host, port, args.max_batch,
             args.max_queue, engine.max_context)
    uvicorn.run(app, host=args.host, port=port, log_level="warning" if args.quiet else "info", ws="none",
                timeout_graceful_shutdown=10)  # then streams still open are cut, and the engine stops


def entry(argv=None) -> int:
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(entry())
