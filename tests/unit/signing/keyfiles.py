"""Key files made at test time for the signing tests (never committed)."""
from __future__ import annotations

import os
from pathlib import Path

from policyd.signing import keys


def write_key(directory: Path, name: str, key_type: str = "rsa", bits: int = 2048,
              mode: int = 0o600) -> tuple[Path, keys.PrivateKey]:
    key, pem = keys.generate(key_type, bits)
    path = Path(directory) / name
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(pem)
    os.chmod(path, mode)
    return path, key
