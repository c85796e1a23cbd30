"""The `qexport` command line. Each subcommand lives in its own module exposing
`register(subparsers)` (adds its parser and sets `func`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import QExportError

VERBOSE_HELP = "also print the warnings and log lines of torch, torchao, executorch and onnx that qexport hides"

# Subcommand modules, in the order `--help` lists them; a missing module is skipped so the CLI
# works while a backend is being written.
SUBCOMMANDS = ("export", "inspect", "compile", "partition", "verify", "bench", "generate", "serve", "demo")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's (the others' modules are not imported, so a
    command checks its arguments before paying for torch and the backends)."""
    p = argparse.ArgumentParser(
        prog="qexport",
        description="Quantize, export and lower PyTorch models: .pt2, AOTInductor, ExecuTorch, ONNX.",
    )
    from .. import __version__

    p.add_argument("--version", action="version", version=f"qexport {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS if only is None else (only,):
        try:
            mod = importlib.import_module(f"{__name__}.{name.replace('-', '_')}_cmd")
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(f"{name}_cmd"):
                continue
            raise
        mod.register(sub)
    for command in sub.choices.values():  # -v is accepted after the command too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        return _run(argv, command)
    except QExportError as e:
        # raised while importing a command's module, before its own handler exists: a torch older than
        # qexport supports (qexport/_upstream.py) is one line here too, not a traceback
        print(f"qexport{' ' + command if command in SUBCOMMANDS else ''}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C lands anywhere: in the seconds `import torch` takes, in a compile; one line either way
        print(f"qexport{' ' + command if command in SUBCOMMANDS else ''}: interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str], command: str | None) -> int:
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .. import quiet

    quiet.install() if not args.verbose else quiet.uninstall()
    try:
        return int(args.func(args) or 0)
    except QExportError as e:
        from ..table import printable

        # messages quote files' contents (manifest fields, member names): escapes reach no terminal
        print(f"qexport {args.command}: error: {printable(e, keep=chr(10))}", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())
