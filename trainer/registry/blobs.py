"""A content-addressed blob directory: ``blobs/{sha256[:2]}/{sha256}``."""

from __future__ import annotations

import hashlib
from pathlib import Path

from shared.files import write_atomically

__all__ = ["BlobStore"]


class BlobStore:
    """Immutable blobs named by their sha256. Writes are atomic and idempotent."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (temp file, fsync, ``os.replace``); return its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        write_atomically(target, data, mode=0o444)
        return digest

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name. Raises ``KeyError`` if absent."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise KeyError(sha256) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"blob {sha256} is corrupt on disk")
        return data
