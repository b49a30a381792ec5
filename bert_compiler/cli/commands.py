"""bert-compile: a thin click layer; each command lists its option groups (cli/options.py),
which parse its flags into specs, and calls the library.

Exit codes: 0 ok; 1 internal error (traceback); 2 usage; 3 bad input; 4 unsupported model;
5 parity failed; 6 missing environment; 7 fusion incomplete; 8 artifact does not match its manifest.
With --json the last stdout line is one JSON object, on success and on failure.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the group.
from bert_compiler.cli import delivery_commands, stage_commands  # noqa: F401
from bert_compiler.cli.app import cli
from bert_compiler.core import interrupts

__all__ = ["cli", "main"]


def main() -> None:
    """Console entry point: SIGINT and SIGTERM unwind like an exception (staging files removed,
    lock released, one line, exit 130/143) instead of killing the process mid-write."""
    interrupts.install()
    cli(prog_name="bert-compile")


if __name__ == "__main__":
    main()
