"""Optional API keys: `Authorization: Bearer KEY` against the SHA-256 of each accepted key.

Replicas hold only the hashes (they travel in the deployment's arguments, which Ray records), the
presented key is hashed and compared with every accepted hash in constant time, and no key or hash
is ever logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from ..errors import InvalidFormatError

ENV_VAR = "ZIMAGE_LORA_API_KEYS"  # comma-separated keys, besides or instead of --api-key-file


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def load_key_hashes(path: str | Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """The hashes of the keys in `path` (one a line; blank lines and `#` comments skipped) and in
    $ZIMAGE_LORA_API_KEYS. Empty when neither is given (no keys: the server is open)."""
    keys: list[str] = []
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidFormatError(f"{path}: cannot read the API key file ({exc}).") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise InvalidFormatError(f"{path}: the API key file holds no key (one key a line).")
    env = (os.environ if environ is None else environ).get(ENV_VAR, "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    short = [k for k in keys if len(k) < 16]
    if short:
        raise InvalidFormatError(f"{len(short)} API key(s) shorter than 16 characters; use long random keys.")
    return sorted({key_hash(k) for k in keys})


def authorized(header: str | None, hashes: list[str]) -> bool:
    """Whether an `Authorization` header value carries one of the keys (always True without keys)."""
    if not hashes:
        return True
    scheme, _, key = (header or "").partition(" ")
    presented = key_hash(key.strip()) if scheme.lower() == "bearer" else ""
    ok = False
    for h in hashes:  # every hash compared, in constant time each: no early exit to time
        ok |= hmac.compare_digest(presented, h)
    return ok
