"""``python -m vramancer.main --mode cli|serve`` (seed 000's lite entry point).

``--mode cli [ARGS...]`` runs the ``vramancer`` CLI (``status`` when no arguments are given);
``--mode serve [ARGS...]`` runs ``vramancer serve``.
"""

from __future__ import annotations

import argparse
import sys


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vramancer.main")
    parser.add_argument("--mode", choices=["cli", "serve"], default="cli")
    known, rest = parser.parse_known_args(argv)
    from vramancer.cli.main import app

    args = ["serve", *rest] if known.mode == "serve" else rest or ["status"]
    app(args=args, prog_name="vramancer")


if __name__ == "__main__":
    run(sys.argv[1:])
