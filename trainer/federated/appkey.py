"""The trainer's app-signing key: the Ed25519 key the run document names in
``trusted_entities`` (:mod:`shared.federated`), so that hosts run only apps signed by the trainer.

Generated on first use in ``{registry}/federated/app-signing-key.pem`` (PKCS#8, mode 0600,
written atomically) and kept: every run names the same key id and public key.

Checked limit (flwr 1.42): nothing can put this key's signature on an app submitted to a
self-hosted SuperLink. ``flwr run`` has no signing option and the SuperLink records an empty
verification for a submitted FAB (only apps fetched from Flower Hub carry signatures), so a
SuperNode started with ``--trusted-entities`` refuses every such app ("The FAB could not be
verified"). See docs/federated.md.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

__all__ = ["KEY_ID", "trainer_public_key"]

KEY_ID = "fpk_edgefleet_trainer"
KEY_FILE = "app-signing-key.pem"


def trainer_public_key(state_dir: Path) -> str:
    """The base64 of the raw 32-byte public key (created with its private key if missing)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = Path(state_dir) / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()
