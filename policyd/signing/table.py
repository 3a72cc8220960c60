"""The signing table: which of its lines sign a message, by the message's
From address (RFC 5322 §3.6.2), and the patterns its lines are written in."""
from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from typing import Iterable

# RFC 5322 §3.6.8 field-name: printable ASCII but the colon.
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                     r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def valid_field_name(name: str) -> bool:
    return bool(_FIELD_NAME.match(name))


@dataclass(frozen=True)
class Pattern:
    kind: str          # "address", "domain" or "any"
    domain: str = ""   # the domain of an address or domain pattern
    address: str = ""  # an address pattern, lower case


def parse_pattern(text: str) -> Pattern:
    """A `match` of the table; raises ValueError saying what it should be."""
    if text == "*":
        return Pattern("any")
    local, at, domain = text.strip().lower().rpartition("@")
    domain = domain.rstrip(".")
    if not _DOMAIN.match(domain) or (at and not local):
        raise ValueError(f"{text!r} is not a domain, an address user@domain, or '*'")
    if at:
        return Pattern("address", domain, f"{local}@{domain}")
    return Pattern("domain", domain)


def aligned(signing_domain: str, from_domain: str) -> bool:
    """DMARC relaxed alignment, without the public suffix list: d= is the
    From domain or a parent of it (RFC 7489 §3.1.1)."""
    return from_domain == signing_domain or from_domain.endswith("." + signing_domain)


def algorithm_of(algorithm: str, key_file: str) -> str:
    """A table line's a=, from its key file when it says auto."""
    if algorithm != "auto":
        return algorithm
    from .keys import load_key
    return load_key(key_file).algorithm


def from_address(values: list[bytes]) -> tuple[str, str]:
    """(address, "") for the one address of the one From field, or ("",
    why not).  RFC 5322 §3.6 allows one From field; DMARC (RFC 7489
    §6.6.1) rejects a message with several or with several addresses, so
    such a message is not signed."""
    if len(values) != 1:
        return "", "no From field" if not values else f"{len(values)} From fields"
    text = values[0].decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    addresses = [address for _, address in email.utils.getaddresses([text]) if address]
    if len(addresses) != 1:
        return "", ("no address in From" if not addresses
                    else f"{len(addresses)} addresses in From")
    address = addresses[0]
    if "@" not in address:
        return "", "no domain in the From address"
    return address, ""


class Table:
    """The table's lines by pattern, for one lookup per message."""

    def __init__(self, lines: Iterable[tuple[Pattern, object]]):
        self.by_address: dict[str, list] = {}
        self.by_domain: dict[str, list] = {}
        self.fallback: list = []
        for pattern, line in lines:
            if pattern.kind == "address":
                self.by_address.setdefault(pattern.address, []).append(line)
            elif pattern.kind == "domain":
                self.by_domain.setdefault(pattern.domain, []).append(line)
            else:
                self.fallback.append(line)

    def lookup(self, address: str) -> list:
        """The lines that sign mail from `address`: the most specific match
        (the address, then the domain or its nearest parent, then '*')."""
        address = address.lower()
        found = self.by_address.get(address)
        if found:
            return found
        domain = address.rpartition("@")[2].rstrip(".")
        while domain:
            found = self.by_domain.get(domain)
            if found:
                return found
            domain = domain.partition(".")[2]
        return self.fallback
