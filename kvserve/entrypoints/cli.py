"""`kvserve` command line: one subcommand per job.

Each subcommand lives in the module that owns the job and exposes
`register(subparsers)`; it adds its parser and sets `func` to a handler taking
the parsed `argparse.Namespace` and returning an exit status.  Handlers import
their heavy dependencies (torch, the engine) lazily so `kvserve --help` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, attribute) pairs; each attribute is `register(subparsers) -> None`.
_SUBCOMMAND_MODULES: list[tuple[str, str]] = [
    ("kvserve.entrypoints.serve_cli", "register"),
    ("kvserve.bench.cli", "register"),
    ("kvserve.eval.cli", "register"),
    ("kvserve.router.cli", "register"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvserve",
        description="kvserve: an LLM serving engine built around the KV cache.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, attr in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a subcommand not built yet
            if exc.name != module_name:
                raise
            continue
        getattr(module, attr)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
