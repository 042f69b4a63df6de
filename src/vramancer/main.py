"""``python -m vramancer.main --mode cli|serve`` (the entry point that needs no
installed script).

``--mode cli [ARGS...]`` runs the ``vramancer`` CLI (``status`` when no arguments are given);
``--mode serve [ARGS...]`` runs ``vramancer serve``. Every other argument, ``--help`` included,
goes to the command.
"""

from __future__ import annotations

import argparse
import sys

USAGE = (
    "python -m vramancer.main [--mode cli|serve] [ARGS...]: --mode cli (the default) runs the "
    "vramancer command with ARGS (status when none), --mode serve runs vramancer serve ARGS."
)


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vramancer.main", add_help=False)
    parser.add_argument("--mode", choices=["cli", "serve"], default="cli")
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from vramancer.cli.main import app

    if known.mode == "cli" and rest[:1] == ["--help"]:
        print(USAGE + "\n")
    args = ["serve", *rest] if known.mode == "serve" else rest or ["status"]
    app(args=args, prog_name="vramancer")


if __name__ == "__main__":
    run(sys.argv[1:])
