"""A Cloud Storage bucket emulated by a local folder, for tests of `gs://` workdirs offline.

Inside `local_buckets(root)`, `gs://BUCKET/PATH` is `root/BUCKET/PATH` for everything that reaches
storage: `etils.epath` (its `gs` backend) and Orbax's TensorStore specs (the GCS kvstore it builds
becomes a file kvstore). Everything above those seams runs as on Cloud Storage: paths stay
`gs://` URLs from end to end (a path that lost a slash, `gs:/BUCKET`, is a local relative path
and lands outside `root`), and Orbax takes its GCS code path (checkpoints committed by a
`commit_success.txt` marker instead of an atomic rename; no hierarchical namespace).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from etils.epath import backend, gpath
from orbax.checkpoint._src.path import gcs_utils

SCHEME = "gs://"


class LocalBucketBackend(backend.Backend):
    """An epath backend for `gs://` URLs that keeps `gs://B/P` at `root/B/P` on the local disk."""

    def __init__(self, root: Path):
        self.root, self.disk = str(root), backend.os_backend

    def local(self, url: os.PathLike | str) -> str:
        """The local path of a `gs://` URL (an AssertionError for anything else)."""
        text = os.fspath(url)
        assert text.startswith(SCHEME), f"not a gs:// URL: {text!r}"
        return os.path.join(self.root, text[len(SCHEME):])

    def url(self, local: str) -> str:
        """The `gs://` URL of a local path under the root."""
        return SCHEME + os.path.relpath(local, self.root)

    def open(self, path, mode):
        return self.disk.open(self.local(path), mode)

    def exists(self, path):
        return self.disk.exists(self.local(path))

    def isdir(self, path):
        return self.disk.isdir(self.local(path))

    def listdir(self, path):
        return self.disk.listdir(self.local(path))

    def glob(self, path):
        return [self.url(found) for found in self.disk.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in self.disk.walk(self.local(top), top_down=top_down,
                                                on_error=on_error):
            yield self.url(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        return self.disk.makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        return self.disk.mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        return self.disk.rmtree(self.local(path))

    def remove(self, path):
        return self.disk.remove(self.local(path))

    def rename(self, path, dst):
        return self.disk.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        return self.disk.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        return self.disk.copy(self.local(path), self.local(dst), overwrite=overwrite)

    def stat(self, path):
        return self.disk.stat(self.local(path))


class FlatBucket:
    """A bucket without hierarchical namespace, as Orbax's bucket lookup returns one."""

    hierarchical_namespace_enabled = False


@contextlib.contextmanager
def local_buckets(root: Path) -> Iterator[LocalBucketBackend]:
    """Within it, every `gs://BUCKET/PATH` lives in `root/BUCKET/PATH` (see the module)."""
    bucket_backend = LocalBucketBackend(root)

    def file_kvstore(url: str) -> dict[str, str]:
        return {"driver": "file", "path": bucket_backend.local(url)}

    with (
        mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": bucket_backend}),
        mock.patch.object(gpath, "_is_tf_installed", return_value=False),
        mock.patch.object(gcs_utils, "get_kvstore_for_gcs", file_kvstore),
        mock.patch.object(gcs_utils, "get_bucket", return_value=FlatBucket()),
    ):
        yield bucket_backend
