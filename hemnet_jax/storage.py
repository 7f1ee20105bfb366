"""Cloud Storage (gs://) for every layer from one switch, and what epath lacks: a bucket check,
conditional writes (the lock), a local staging folder for writers that need a local file.

Paths that may be gs:// go through etils epath. `configure()` (every program calls it first, via
`cli.run`) sets each layer up before it first touches a bucket:
- epath reaches gs:// through fsspec's gcsfs (`EPATH_USE_TF=false`), not TensorFlow's GCS
  filesystem: gcsfs honours `STORAGE_EMULATOR_HOST`, TensorFlow's has Google's endpoints compiled
  in; gcsfs's listing cache is off (another host's writes must be seen at once);
- with `STORAGE_EMULATOR_HOST=http://HOST:PORT` (a Cloud Storage API server such as the local
  one the tests start, docs/operations.md), TensorStore (orbax's arrays) is pointed at it with
  `TENSORSTORE_GCS_HTTP_URL`; neither looks for credentials (nor for a metadata server), and
  gcsfs skips the bucket-layout API such servers lack.
TensorFlow's own gs:// reads (tf.data over a TFDS data_dir) ignore STORAGE_EMULATOR_HOST; they
reach such a server only through an HTTPS proxy (tests/gcs_server.py's TlsProxy).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Mapping

from hemnet_jax.errors import UserError

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


class StorageError(OSError, UserError):
    """A bucket path that cannot be used: missing bucket or object, unreachable server."""


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a URL (gs://...) rather than a local path."""
    return path is not None and "://" in os.fspath(path)


def emulator_url() -> str | None:
    """STORAGE_EMULATOR_HOST as a URL (http:// added when it names only HOST:PORT), or None."""
    host = os.environ.get(EMULATOR_VARIABLE, "")
    if host in ("", "default"):
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure() -> None:
    """Derives every layer's setting from the environment (see the module docstring); call it
    before any gs:// path is opened. Variables the user set stay as they are."""
    os.environ.setdefault("EPATH_USE_TF", "false")
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    url = emulator_url()
    if url is not None:  # no credentials, and no look for them beyond the server
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore's
        os.environ.setdefault("NO_GCE_CHECK", "true")  # google-auth: no metadata server
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        for protocol in ("gs", "gcs"):
            fsspec.config.conf[protocol].setdefault("token", "anon")


def _bucket(path: str) -> str:
    return urllib.parse.urlparse(path).netloc


def _bucket_exists(bucket: str) -> bool:
    """One request for the bucket's metadata, without gcsfs's retries (half a minute of backoff
    on an unreachable server)."""
    import fsspec.asyn
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    once = gcsfs.GCSFileSystem._request.__wrapped__
    try:
        fsspec.asyn.sync(fs.loop, once, fs, "GET", "b/{}", bucket, timeout=60)
    except FileNotFoundError:
        return False
    return True


def _where() -> str:
    url = emulator_url()
    return f"the Cloud Storage server at {url} ({EMULATOR_VARIABLE})" if url else "Cloud Storage"


def check_bucket(path: str, key: str) -> None:
    """Raises StorageError (one line naming `key`) unless the bucket of gs:// `path` answers;
    local paths pass."""
    if not is_remote(path):
        return
    if not path.startswith("gs://"):
        raise StorageError(f"{key} {path}: only local paths and gs:// are supported.")
    bucket = _bucket(path)
    try:
        found = _bucket_exists(bucket)
    except Exception as e:  # unreachable server, no credentials, no permission
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StorageError(
            f"{key} {path}: cannot reach {_where()}: {first}. Check the network, the "
            "credentials (gcloud auth application-default login) or the server."
        ) from e
    if not found:
        raise StorageError(
            f"{key} {path}: the bucket gs://{bucket} does not exist on {_where()} (or this "
            "account may not read it). Create it (gcloud storage buckets create) or fix the path."
        )


def _split(path: str) -> tuple[str, str]:
    parsed = urllib.parse.urlparse(path)
    return parsed.netloc, parsed.path.lstrip("/")


def require_local(program: str, paths: Mapping[str, str | None]) -> None:
    """Raises StorageError naming `program` and the key if one of `paths` (key -> path) is a URL:
    for what a program reads or writes with local-only libraries (PIL, matplotlib, subprocesses'
    log files)."""
    for key, path in paths.items():
        if is_remote(path):
            raise StorageError(
                f"{program}: {key} {path}: this program reads and writes it as a local path; "
                "pass a local path (copy to or from the bucket with gcloud storage cp)."
            )


def check_tensorflow_path(path: str | None, key: str, *, write: bool = False) -> None:
    """Raises StorageError if TensorFlow itself must open the gs:// `path` (a TFDS data_dir:
    tf.data reads its TFRecords) while STORAGE_EMULATOR_HOST names the server: TensorFlow's GCS
    filesystem has Google's endpoints compiled in and would fail deep inside tf.data. It reads
    from such a server only through an HTTPS proxy (`https_proxy`, docs/operations.md); its
    writes (resumable uploads) do not complete against fake-gcs-server even so."""
    url = emulator_url()
    proxied = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if url is None or not is_remote(path) or (proxied and not write):
        return
    how = ("writes here through TensorFlow, which cannot write to" if write else
           "reads this path through TensorFlow, which ignores")
    raise StorageError(
        f"{key}={path}: TFDS {how} {EMULATOR_VARIABLE}={url} (docs/operations.md). Use a local "
        "folder (then copy it to the bucket), or unset the variable to use Cloud Storage itself."
    )


def write_if_generation(path: str, data: bytes, generation: int) -> int | None:
    """Writes the gs:// object `path` only if its generation is `generation` (0: only if it does
    not exist), in one request with `ifGenerationMatch`: Cloud Storage applies it atomically, so
    of two racing writers exactly one wins. Returns the new generation, or None if it lost."""
    import json
    from urllib.parse import quote

    import gcsfs

    fs = gcsfs.GCSFileSystem()
    bucket, key = _split(path)
    head = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{json.dumps({'name': key})}"
            "\n--==0==\nContent-Type: application/octet-stream\n\n")
    body = head.encode() + data + b"\n--==0==--"
    try:
        written = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                          uploadType="multipart", ifGenerationMatch=str(generation), data=body,
                          headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                          json_out=True)
    except FileExistsError:  # 412 Precondition Failed
        return None
    fs.invalidate_cache(path)
    return int(written["generation"])


def read_with_generation(path: str) -> tuple[bytes, int] | None:
    """The gs:// object's bytes and generation (the bytes are of that generation), or None if it
    does not exist (or was replaced meanwhile)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    bucket, key = _split(path)
    try:
        generation = int(fs.info(path)["generation"])
        _, data = fs.call("GET", "b/{}/o/{}", bucket, key, alt="media", generation=generation)
    except FileNotFoundError:
        return None
    return data, generation


def delete_if_generation(path: str, generation: int) -> None:
    """Deletes the gs:// object if its generation is still `generation` (else leaves it)."""
    import gcsfs

    fs = gcsfs.GCSFileSystem()
    bucket, key = _split(path)
    try:
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
    except (FileNotFoundError, FileExistsError):
        pass
    fs.invalidate_cache(path)


def move_tree(source: str, destination: str) -> None:
    """Moves the folder `source` to `destination` (a new path whose parent exists): a rename on
    local disk; in a bucket, which has no folders to rename, each object copied, then deleted."""
    if is_remote(source):
        import gcsfs

        # copy + rm, not gcsfs's mv: its mv first tries the moveTo API, which only buckets with
        # a hierarchical namespace have, and logs each refusal with a traceback (seen against
        # the local server, as on any plain bucket) before it copies anyway.
        fs = gcsfs.GCSFileSystem()
        fs.copy(source, destination, recursive=True)
        fs.rm(source, recursive=True)
    else:
        os.rename(source, destination)


class Staging:
    """A local folder mirrored into a gs:// folder, for writers that need a local file (logging's
    FileHandler appends; TensorBoard's event writer goes through TensorFlow, which cannot reach
    every Cloud Storage server). `sync()` uploads each file that changed since the last sync,
    whole: an object cannot be appended to. What was written after the last sync is lost if the
    process is killed."""

    def __init__(self, remote: str):
        self.remote = remote.rstrip("/")
        self.local = tempfile.mkdtemp(prefix="hemnet_jax_staging_")
        self._synced: dict[str, tuple[int, int]] = {}
        atexit.register(self.close)

    def resume(self, name: str) -> str:
        """The local path of `name`, with the bucket's copy downloaded first (to append to)."""
        from etils import epath

        local, remote = os.path.join(self.local, name), epath.Path(f"{self.remote}/{name}")
        if not os.path.exists(local) and remote.exists():
            with open(local, "wb") as f:
                f.write(remote.read_bytes())
        return local

    def sync(self) -> None:
        """Uploads every file that changed (size or mtime) since the last sync."""
        from etils import epath

        for root, _, files in os.walk(self.local):
            for name in files:
                local = os.path.join(root, name)
                stat = os.stat(local)
                if self._synced.get(local) == (stat.st_size, stat.st_mtime_ns):
                    continue
                rel = os.path.relpath(local, self.local)
                with open(local, "rb") as f:
                    epath.Path(f"{self.remote}/{rel}").write_bytes(f.read())
                self._synced[local] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        """A last sync; the local folder is removed."""
        if os.path.isdir(self.local):
            try:
                self.sync()
            finally:
                shutil.rmtree(self.local, ignore_errors=True)


_STAGINGS: dict[str, Staging] = {}


def staging(remote: str) -> Staging:
    """This process's Staging of the gs:// folder `remote` (one per folder)."""
    key = remote.rstrip("/")
    if key not in _STAGINGS:
        _STAGINGS[key] = Staging(key)
    return _STAGINGS[key]
