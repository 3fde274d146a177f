"""`python -m mmserve.models.tiny`: build (or find) tiny checkpoints and print where they are."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmserve.models.tiny.cache import default_cache_dir, ensure_checkpoint
from mmserve.models.tiny.registry import CHECKPOINTS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mmserve.models.tiny",
        description="Build the random-weight demo/test checkpoints (or find them in the cache); "
        "prints one 'name<TAB>path' line per checkpoint.",
    )
    parser.add_argument(
        "--name",
        action="append",
        choices=list(CHECKPOINTS),
        help="checkpoint to build; repeat for several (default: all)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"cache root (default: {default_cache_dir()})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the tiny random-weight checkpoints (offline), or find them in the cache."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in args.name or list(CHECKPOINTS):
        path = ensure_checkpoint(name, args.cache_dir)
        print(f"{name}\t{path}", flush=True)
    return 0
