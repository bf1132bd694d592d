"""The ``arcdeploy`` command: a thin layer over the library's public functions.

Each sub-command lives in its own module here with ``register(subparsers)``,
which adds its parser and sets ``func``; heavy libraries are imported inside
the handlers so ``arcdeploy --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading

from ..errors import ArcdeployError, describe, printable
from ..machine import keep_freed_memory

COMMANDS = (
    "export",
    "build",
    "check",
    "embed",
    "compare",
    "detect",
    "bench",
    "eval",
    "gallery",
    "serve",
    "run",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="arcdeploy",
        description="Turn an arcface_torch checkpoint into a fast, verified inference package, and measure it.",
    )
    parser.add_argument("--version", action="version", version=f"arcdeploy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


class _OneLine(logging.Formatter):
    """Library warnings on stderr as ``arcdeploy: warning: ...``, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        msg = printable(record.getMessage())
        return f"arcdeploy: {record.levelname.lower()}: {msg}"


def _setup_logging() -> None:
    logger = logging.getLogger("arcdeploy")
    if not any(getattr(h, "_arcdeploy_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        handler._arcdeploy_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    level = os.environ.get("ARCDEPLOY_LOG", "WARNING").upper()
    logger.setLevel(getattr(logging, level, logging.WARNING))


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so every ``with`` and ``finally`` on the way out runs:
    temporary folders are removed and outputs stay whole, as after Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = args.func(args)
    except Terminated:
        print(f"arcdeploy {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except ArcdeployError as exc:
        print(f"arcdeploy {args.command}: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arcdeploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("ARCDEPLOY_DEBUG"):
            raise
        print(
            f"arcdeploy {args.command}: internal error: {printable(describe(exc))} "
            "(set ARCDEPLOY_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return int(code or 0)


def entry() -> None:
    # a process of arcdeploy's own: large photos are decoded over and over (see keep_freed_memory)
    keep_freed_memory()
    sys.exit(main())
