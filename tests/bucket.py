"""What tests of gs:// paths share: the bucket's name, a client of the local Cloud Storage server
(the `gcs` fixture, tests/conftest.py), and a subprocess's environment that reaches it."""

from hemnet_jax import storage
from tests.test_train import _subprocess_env

BUCKET = "bkt"


def bucket_fs():
    """A gcsfs client of the server (STORAGE_EMULATOR_HOST), no caches: other processes' writes
    are seen at once."""
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)


def bucket_env(gcs, num_devices: int = 2, *, tensorflow: bool = True) -> dict[str, str]:
    """A subprocess's environment: the test session's, STORAGE_EMULATOR_HOST and nothing else of
    Cloud Storage (the program derives the rest), and unless not `tensorflow`, the proxy
    settings through which TensorFlow reads from the server."""
    env = _subprocess_env(num_devices)
    for name in ("EPATH_USE_TF", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT",
                 "GOOGLE_AUTH_TOKEN_FOR_TESTING", "NO_GCE_CHECK"):
        env.pop(name, None)
    env[storage.EMULATOR_VARIABLE] = gcs.url
    if tensorflow:
        env.update(gcs.proxy.environment())
    return env
