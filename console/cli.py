"""The ``burrow`` command.  Engine commands are handed to :mod:`backend.cli`."""

from __future__ import annotations

import sys

ENGINE_COMMANDS = {"serve", "agent", "http", "tcp", "tls"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from backend.cli import main as engine_main

    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
