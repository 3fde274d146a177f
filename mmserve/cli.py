"""The `mmserve` command: one entry point for every role.

    mmserve up          the whole stack on one machine (Redis, encoder, decoder, gateway)
    mmserve encoder     the encoder gRPC service
    mmserve decoder     the decoder gRPC service
    mmserve gateway     the OpenAI-compatible REST gateway
    mmserve encode      precompute embeddings of files or URLs, print their ids
    mmserve tiny        build the tiny random-weight checkpoints (offline)
    mmserve health      check a gRPC service's health (used by container healthchecks)
    mmserve token FILE  write a random service token to FILE unless it exists (compose's token job)

Services read their configuration from MMSERVE_* environment variables (see
`mmserve.config.Settings`); the same command runs in tests, in `mmserve up`
and in compose. Role modules are imported lazily so that `mmserve gateway`
never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def _encoder(_: argparse.Namespace) -> int:
    from services.encoder.main import main

    main()
    return 0


def _decoder(_: argparse.Namespace) -> int:
    from services.decoder.main import main

    main()
    return 0


def _gateway(_: argparse.Namespace) -> int:
    from gateway.main import main

    main()
    return 0


def _health(ns: argparse.Namespace) -> int:
    if ns.target.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(ns.target, timeout=ns.timeout) as response:
                return 0 if response.status == 200 else 1
        except OSError:
            return 1
    from mmserve.rpc.health import check

    return 0 if check(ns.target, ns.service, timeout=ns.timeout) else 1


def _token(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from mmserve.rpc.auth import write_token_file

    made = write_token_file(Path(ns.file))
    print(f"{'wrote a new' if made else 'kept the'} service token in {ns.file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description="Serve multimodal LLMs with shared embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole stack on this machine (see mmserve up --help)")
    sub.add_parser("encoder", help="run the encoder gRPC service").set_defaults(run=_encoder)
    sub.add_parser("decoder", help="run the decoder gRPC service").set_defaults(run=_decoder)
    sub.add_parser("gateway", help="run the OpenAI-compatible REST gateway").set_defaults(run=_gateway)
    sub.add_parser("encode", help="precompute embeddings of files or URLs, print their ids (see mmserve encode --help)")
    sub.add_parser("tiny", help="build the tiny random-weight checkpoints (see mmserve tiny --help)")
    health = sub.add_parser("health", help="exit 0 if a gRPC service reports SERVING (or an HTTP URL answers 200)")
    health.add_argument("target", help="host:port of a gRPC service, or an http(s):// URL")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(run=_health)
    token = sub.add_parser("token", help="write a random service token to FILE unless it exists")
    token.add_argument("file")
    token.set_defaults(run=_token)
    return parser


#: Subcommands with their own argument parsers: everything after the name is theirs.
PASSTHROUGH = {"up": "mmserve.stack", "encode": "mmserve.precompute", "tiny": "mmserve.models.tiny"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        module = importlib.import_module(PASSTHROUGH[argv[0]])
        return int(module.main(argv[1:]))
    ns = build_parser().parse_args(argv)
    return int(ns.run(ns))


if __name__ == "__main__":
    sys.exit(main())
