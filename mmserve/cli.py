"""The `mmserve` command: one entry point for every role.

    mmserve up          the whole stack on one machine (Redis, encoder, decoder, gateway)
    mmserve encoder     the encoder gRPC service
    mmserve decoder     the decoder gRPC service
    mmserve gateway     the OpenAI-compatible REST gateway
    mmserve encode      precompute embeddings of files or URLs, print their ids
    mmserve tiny        build the tiny random-weight checkpoints (offline)
    mmserve health      check a gRPC service's health (used by container healthchecks)
    mmserve token FILE  write a random service token to FILE unless it exists (compose's token job)

Each subcommand is an entry point of the group `mmserve.commands`
(pyproject.toml): a callable `(argv) -> exit status` in the package that owns
the role, loaded only when it runs. So this shared module imports neither the
services nor the gateway, `mmserve gateway` never imports torch, and a
command is added by one line in pyproject.toml. Services read their
configuration from MMSERVE_* environment variables (see
`mmserve.config.Settings`); the same command runs in tests, in `mmserve up`
and in compose.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

GROUP = "mmserve.commands"
Command = Callable[[list[str]], int]


def commands() -> dict[str, EntryPoint]:
    """The installed subcommands by name (from the package metadata: reinstall after editing pyproject.toml)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _source(module: str) -> Path | None:
    """The file of `module`, found without importing it or its parent packages."""
    head, *rest = module.split(".")
    spec = importlib.util.find_spec(head)
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for base in spec.submodule_search_locations or []:
        for candidate in (Path(base, *rest).with_suffix(".py"), Path(base, *rest, "__init__.py")):
            if candidate.is_file():
                return candidate
    return None


def summary(ep: EntryPoint) -> str:
    """First line of the command's docstring, read from its source: importing the service commands would load torch."""
    path = _source(ep.module)
    if path is None:
        return "(not installed)"
    tree = ast.parse(path.read_text(), str(path))
    found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == ep.attr]
    doc = ast.get_docstring(found[0]) if found else ast.get_docstring(tree)
    return (doc or "").strip().splitlines()[0].rstrip(".") if doc else ""


def build_parser(found: dict[str, EntryPoint]) -> argparse.ArgumentParser:
    """The top-level parser: only for --help and for an unknown command (each command parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="mmserve",
        description="Serve multimodal LLMs with shared embeddings.",
        epilog="`mmserve COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, ep in found.items():
        sub.add_parser(name, help=summary(ep), add_help=False)
    return parser


def role_arguments(role: str, description: str | None, argv: list[str] | None) -> None:
    """Parse the command line of a role that takes no arguments (its settings are MMSERVE_* variables), for --help."""
    argparse.ArgumentParser(prog=f"mmserve {role}", description=description).parse_args([] if argv is None else argv)


#: The roles that run torch models with the built-in engine (see `main`).
TORCH_ROLES = frozenset({"encoder", "decoder"})
#: How their idle OpenMP threads wait: spin ~30 µs (libgomp's own estimate: 100000 spins per ms), then sleep.
#: Enough to bridge the gaps between the parallel regions of one forward pass; short enough that a process
#: between passes leaves the cores to the other one.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}


def main(argv: list[str] | None = None) -> int:
    """Run the subcommand named by argv[0] with the rest of argv."""
    argv = sys.argv[1:] if argv is None else argv
    found = commands()
    if not found:
        print(f"mmserve: no commands installed (entry-point group {GROUP}): reinstall the package (pip install -e .)", file=sys.stderr)
        return 2
    if not argv or argv[0] not in found:
        build_parser(found).parse_args(argv[:1])  # prints the help or the error, and exits
        return 2
    if (
        argv[0] in TORCH_ROLES
        and os.environ.get("MMSERVE_DECODER_ENGINE", "transformers") != "vllm"
        and not any(name in os.environ for name in OPENMP_WAIT)
    ):
        # Before the role imports torch (libgomp reads these once, when it loads). libgomp's default wait
        # (~3 ms of spinning after every parallel region) made the encoder's and the decoder's teams burn the
        # cores the other one needed under load; sleeping at once (PASSIVE alone) fixed that (mid checkpoint,
        # 16 concurrent: 80 -> 104 tok/s, TTFT p50 3.5 -> 1.3 s) but made every region of a forward pass pay a
        # futex wake-up (the tiny vision tower 9.6 -> 19.9 ms); the short spin keeps both (docs/engine.md).
        # vLLM's engine keeps its own policy; either variable in the environment means the user chose.
        os.environ.update(OPENMP_WAIT)
    command: Command = found[argv[0]].load()
    return int(command(argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
