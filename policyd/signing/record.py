"""DKIM key records (RFC 6376 §3.6.1): parsed, and held against a private
key, for `policyd dkim test` and `rotate`."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .keys import PrivateKey

# RFC 6376 §3.2: tag-name = ALPHA *ALNUMPUNC
_TAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class RecordError(Exception):
    """A record that is no DKIM key record; the text says why."""


@dataclass(frozen=True)
class KeyRecord:
    key_type: str            # k=, "rsa" when absent
    public: bytes            # p=, decoded; empty: the key is revoked
    hashes: tuple[str, ...]  # h=, empty: any
    services: tuple[str, ...]
    flags: tuple[str, ...]   # t=: "y" testing, "s" no subdomains


def parse_tags(text: str) -> dict[str, str]:
    """RFC 6376 §3.2 tag-list: a tag given twice is an error, as is a
    tag without '='; white space around names and values is dropped."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue   # the tag-list may end with ';'
        name, equals, value = part.partition("=")
        name = name.strip()
        if not equals or not _TAG_NAME.match(name):
            raise RecordError(f"{part.strip()!r} is not a tag=value pair")
        if name in tags:
            raise RecordError(f"the tag {name}= is given twice")
        tags[name] = value.strip()
    return tags


def parse_record(text: str) -> KeyRecord:
    tags = parse_tags(text)
    # RFC 6376 §3.6.1: v= is optional, but if present it MUST be first and DKIM1.
    if "v" in tags and (next(iter(tags)) != "v" or tags["v"] != "DKIM1"):
        raise RecordError("v= must come first and say DKIM1")
    if "p" not in tags:
        raise RecordError("no p= (the public key)")
    try:
        public = base64.b64decode(re.sub(r"\s+", "", tags["p"]), validate=True)
    except (binascii.Error, ValueError):
        raise RecordError("p= is not base64") from None

    def listed(name: str, default: str = "") -> tuple[str, ...]:
        return tuple(item.strip() for item in tags.get(name, default).split(":")
                     if item.strip())
    return KeyRecord(tags.get("k", "rsa"), public, listed("h"), listed("s", "*"),
                     listed("t"))


def problems(record: KeyRecord, key: PrivateKey) -> list[str]:
    """What keeps a verifier from taking `key`'s signatures with this
    record; empty when it matches."""
    found = []
    if not record.public:
        found.append("p= is empty: the key is revoked (RFC 6376 §3.6.1)")
    elif record.key_type != key.key_type:
        found.append(f"k={record.key_type}, but the key is {key.key_type}")
    elif record.public != key.public:
        found.append("p= is another public key than the private key's")
    if record.hashes and "sha256" not in record.hashes:
        found.append(f"h={':'.join(record.hashes)} does not allow sha256")
    if not ({"*", "email"} & set(record.services)):
        found.append(f"s={':'.join(record.services)} is not for email")
    return found
