"""A tiny model server for the process backend's tests: ``python model_server.py PORT INFO``.

It writes ``INFO`` (JSON: its pid, its child's pid, ``CUDA_VISIBLE_DEVICES``), starts a child
process in the same process group (a worker, as real servers have), waits ``--delay`` seconds,
then answers ``GET /health`` with 200. ``--exit N`` makes it exit at once with code N instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = 200 if self.path == "/health" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("info")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--exit", type=int, default=None)
    args = parser.parse_args()
    print("model server starting", flush=True)
    if args.exit is not None:
        print("cannot find the weights", flush=True)
        sys.exit(args.exit)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(args.info, "w") as fh:
        json.dump(
            {
                "pid": os.getpid(),
                "child": child.pid,
                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            },
            fh,
        )
    time.sleep(args.delay)
    HTTPServer(("127.0.0.1", args.port), Health).serve_forever()


if __name__ == "__main__":
    main()
