"""API keys and the banks each may use: `--api-key KEY` (every bank), `--api-key KEY=bank1,bank2`, or a keys file."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import McLlavaError

ALL_BANKS = None  # what a key that may use every bank maps to
KEY_BANKS = "mcllava_key_banks"  # where `RequestGuard` leaves the key's banks in the request's state


def key_banks(request) -> frozenset[str] | None:
    """The banks the request's key may use (None: every bank, or no key is needed)."""
    return getattr(request.state, KEY_BANKS, ALL_BANKS)


class KeyRing:
    """Keys, each with the bank names it may use (`ALL_BANKS`: any). `match` checks a presented key in constant
    time against every key and says which banks it opens."""

    def __init__(self, keys: Mapping[str, frozenset[str] | None]):
        for key in keys:
            if not key.strip():
                raise McLlavaError(
                    "the API key is empty (--api-key or MCLLAVA_API_KEY): give a real key, or none to serve on "
                    "this machine only"
                )
            if any(c.isspace() or not c.isprintable() for c in key):
                raise McLlavaError("an API key must be without spaces or control characters")
        self._keys = [(k.encode("utf-8"), banks) for k, banks in keys.items()]

    @classmethod
    def parse(cls, specs: Iterable[str]) -> KeyRing:
        """Keys from `KEY` (every bank) or `KEY=bank1,bank2` specs (split at the last `=`: a key ending in `=`, as
        base64 keys may, is a whole key); the same key twice is refused."""
        keys: dict[str, frozenset[str] | None] = {}
        for spec in specs:
            key, sep, names = spec.strip().rpartition("=")
            banks = frozenset(n.strip() for n in names.split(",") if n.strip())
            if sep and not key and banks:
                raise McLlavaError("an API key given as KEY=BANKS has no key before the '='")
            if not sep or not banks:  # no '=', or a trailing one: the whole spec is a key for every bank
                key, banks = spec.strip(), ALL_BANKS
            if key in keys:
                raise McLlavaError("an API key is given twice")
            keys[key] = banks
        return cls(keys)

    @classmethod
    def read(cls, path: str | Path) -> list[str]:
        """The key specs of a keys file: one `KEY` or `KEY=bank1,bank2` a line; blank lines and `#` comments skipped."""
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise McLlavaError(f"cannot read the keys file {path}: {exc}") from None
        return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def check_banks(self, served: Iterable[str]) -> None:
        """Refuse a key that names a bank the server does not hold (a typo would lock its user out)."""
        served = set(served)
        for _, banks in self._keys:
            unknown = sorted((banks or set()) - served)
            if unknown:
                raise McLlavaError(
                    f"an API key names bank(s) not served: {', '.join(unknown)} (served: {', '.join(sorted(served))})"
                )

    def match(self, given: Iterable[bytes]) -> tuple[bool, frozenset[str] | None]:
        """(whether one of the presented keys is a key, the banks it may use). Every key is compared, in constant time."""
        found, banks = False, ALL_BANKS
        for g in given:
            for key, allowed in self._keys:
                if hmac.compare_digest(g, key) and not found:
                    found, banks = True, allowed
        return found, banks
