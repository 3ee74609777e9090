"""``msxai`` command line. Each subcommand lives in ``msxai.commands.<name>`` and exposes
``register(subparsers)`` which adds its parser and sets ``func`` (called with the parsed args)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from msxai.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    import msxai.commands as commands

    parser = argparse.ArgumentParser(prog="msxai", description="Explainable MS lesion segmentation")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"msxai.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except InputError as exc:
        print(f"msxai {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
