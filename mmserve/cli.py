"""The `mmserve` command: one entry point for every role.

    mmserve up          the whole stack on one machine (Redis, encoder, decoder, gateway)
    mmserve encoder     the encoder gRPC service
    mmserve decoder     the decoder gRPC service
    mmserve gateway     the OpenAI-compatible REST gateway
    mmserve tiny        build the tiny random-weight checkpoints (offline)
    mmserve health      check a gRPC service's health (used by container healthchecks)

Services read their configuration from MMSERVE_* environment variables (see
`mmserve.config.Settings`); the same command runs in tests, in `mmserve up`
and in compose. Role modules are imported lazily so that `mmserve gateway`
never imports torch.
"""

from __future__ import annotations

import argparse
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


def _up(ns: argparse.Namespace) -> int:
    from mmserve.stack import main

    return main(ns.rest)


def _tiny(ns: argparse.Namespace) -> int:
    from mmserve.models.tiny import main

    return main(ns.rest)


def _health(ns: argparse.Namespace) -> int:
    from mmserve.rpc.health import check

    return 0 if check(ns.target, ns.service, timeout=ns.timeout) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmserve", description="Serve multimodal LLMs with shared embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole stack on this machine", add_help=False)
    up.add_argument("rest", nargs=argparse.REMAINDER)
    up.set_defaults(run=_up)
    sub.add_parser("encoder", help="run the encoder gRPC service").set_defaults(run=_encoder)
    sub.add_parser("decoder", help="run the decoder gRPC service").set_defaults(run=_decoder)
    sub.add_parser("gateway", help="run the OpenAI-compatible REST gateway").set_defaults(run=_gateway)
    tiny = sub.add_parser("tiny", help="build tiny random-weight checkpoints", add_help=False)
    tiny.add_argument("rest", nargs=argparse.REMAINDER)
    tiny.set_defaults(run=_tiny)
    health = sub.add_parser("health", help="exit 0 if a gRPC service reports SERVING")
    health.add_argument("target", help="host:port of the service")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(run=_health)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.run(ns))


if __name__ == "__main__":
    sys.exit(main())
