"""The `signing:` config section (read by policyd/config.py): the signing
table, the header lists, and the rules that span them.  Each key file is
read and checked here, at config load and at every reload, so that an
unreadable or mismatched key stops the start (exit 78) or refuses the
reload instead of leaving mail unsigned."""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Iterator


class Algorithm(enum.StrEnum):
    AUTO = "auto"                      # what the key file holds
    RSA_SHA256 = "rsa-sha256"          # RFC 6376 §3.3, RFC 8301
    ED25519_SHA256 = "ed25519-sha256"  # RFC 8463


class Canonicalization(enum.StrEnum):
    RELAXED_RELAXED = "relaxed/relaxed"
    RELAXED_SIMPLE = "relaxed/simple"
    SIMPLE_RELAXED = "simple/relaxed"
    SIMPLE_SIMPLE = "simple/simple"


class OnSigningError(enum.StrEnum):
    DEFER = "defer"     # 451 4.3.0: the sender's MTA tries again
    ACCEPT = "accept"   # pass it unsigned, logged as an error


# RFC 6376 §5.4.1: the fields a signer SHOULD sign when present.
SIGNED_HEADERS = (
    "from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from",
    "resent-sender", "resent-to", "resent-cc", "in-reply-to", "references", "list-id",
    "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "content-id", "content-description", "sender")

# RFC 6376 §8.15: fields listed once more than they occur, so that a field
# of that name added in transit (a second From, a Reply-To where there was
# none) breaks the signature.  RFC 5322 §3.6 allows each of these at most
# once, so no legitimate hop adds one.
OVERSIGNED_HEADERS = (
    "from", "to", "cc", "subject", "date", "reply-to", "message-id", "sender",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding")


@dataclass(frozen=True)
class SigningKey:
    """One line of the signing table."""
    # The keys are described together, in signing.table's doc below.
    match: str = ""
    domain: str = field(default="", metadata={"kind": "domain"})
    selector: str = ""
    key_file: str = ""
    algorithm: Algorithm = Algorithm.AUTO

    @property
    def signing_domain(self) -> str:
        """d=: the domain given, else the domain of the pattern."""
        if self.domain:
            return self.domain
        return self.match.rpartition("@")[2].lower().rstrip(".")

    def problems(self, config: object) -> Iterator[tuple[str, str]]:
        from . import keys, table
        try:
            table.parse_pattern(self.match)
        except ValueError as error:
            yield "match", str(error)
            return
        if self.match == "*" and not self.domain:
            yield "domain", "the fallback line (match: '*') needs its signing domain"
            return
        if self.domain and self.match != "*" and not table.aligned(
                self.domain, table.parse_pattern(self.match).domain):
            yield "domain", (f"{self.domain!r} is not {table.parse_pattern(self.match).domain!r} "
                             "nor a parent "
                             "of it, so the signature would not align with the From "
                             "domain (DMARC); use a line with match: '*' for a fallback")
            return
        if not keys.valid_selector(self.selector):
            yield "selector", (f"{self.selector!r} is not a selector (RFC 6376 §3.1: "
                               "dot-separated labels of letters, digits and '-')")
            return
        if not self.key_file:
            yield "key_file", "a key file is needed"
            return
        try:
            key = keys.load_key(self.key_file)
        except keys.KeyFileError as error:
            yield "key_file", str(error)
            return
        if self.algorithm is not Algorithm.AUTO and key.algorithm != self.algorithm:
            yield "algorithm", (f"{self.algorithm.value} given, but {self.key_file} holds "
                                f"an {key.description} key ({key.algorithm})")


_TABLE_DOC = (
    "The signing table: a list of mappings, each one signature to add to outbound mail.  "
    "match: whose mail, by the From address: a domain (its subdomains too, at label "
    "boundaries), an address user@domain, or '*' for any (the fallback).  The most "
    "specific match wins (an address, then the longest domain, then '*'), and every "
    "line with that same match signs: one RSA and one Ed25519 line make a dual "
    "signature (RFC 8463; an Ed25519 line needs an RSA line beside it, as many "
    "receivers verify only RSA).  domain: d=, the signing domain; default the "
    "domain of match; it must be that domain or a parent of it (DMARC alignment), "
    "except on the '*' line, where it is required.  selector: s=.  key_file: the "
    "private key, PEM (as policyd dkim genkey and opendkim-genkey write it) or a "
    "dkimpy Ed25519 seed; readable by policyd and by no other user; read at start "
    "and at every reload.  algorithm: auto (what the key is), rsa-sha256 or "
    "ed25519-sha256 (then the key must be of that type).  Empty: no signing.")


@dataclass(frozen=True)
class SigningConfig:
    table: tuple[SigningKey, ...] = field(default=(), metadata={"doc": _TABLE_DOC})
    nat_own_domains: bool = field(default=False, metadata={"doc": (
        "Also sign mail from nat.networks whose From domain is one of "
        "nat.own_domains (mail from authorized relay clients, by SASL, relay "
        "networks or certificates, is always signed; other clients' never).  Only "
        "when nat.networks hold your own senders alone: a NAT gateway that also "
        "passes outside clients' connections would have their forgeries signed.  "
        "Needs milter.dkim.nat_requires_aligned_pass: flag.")})
    headers: tuple[str, ...] = field(default=SIGNED_HEADERS, metadata={"doc": (
        "Header fields signed, each as often as it occurs (RFC 6376 §5.4.1).")})
    oversign: tuple[str, ...] = field(default=OVERSIGNED_HEADERS, metadata={"doc": (
        "Header fields signed once more than they occur, present or not (RFC 6376 "
        "§8.15), so that one added in transit, a second From for instance, breaks "
        "the signature.")})
    canonicalization: Canonicalization = field(
        default=Canonicalization.RELAXED_RELAXED, metadata={"doc": (
            "c=, header/body (RFC 6376 §3.4).  l= is never used.")})
    resign: bool = field(default=False, metadata={"doc": (
        "Sign a message that already carries a valid signature made with one of "
        "the table's keys (checked against the key itself, without DNS).")})
    on_error: OnSigningError = field(default=OnSigningError.DEFER, metadata={"doc": (
        "What outbound mail that should be signed and cannot be does: defer "
        "(451 4.3.0, the client tries again) or accept (unsigned); logged as an "
        "error either way.")})

    def problems(self, config: object) -> Iterator[tuple[str, str]]:
        from . import table
        milter = getattr(config, "milter", None)
        nat_rule = getattr(getattr(milter, "dkim", None), "nat_requires_aligned_pass", "flag")
        if self.nat_own_domains and nat_rule != "flag":
            # That rule refuses own-domain NAT mail that arrives unsigned: there
            # would be nothing left for this key to sign but mail another
            # signer already signed.
            yield "nat_own_domains", (
                f"needs milter.dkim.nat_requires_aligned_pass: flag (it is "
                f"{getattr(nat_rule, 'value', nat_rule)}: unsigned own-domain mail from "
                "nat.networks is refused before it could be signed)")
        for n, name in enumerate(self.headers + self.oversign):
            if not table.valid_field_name(name):
                key = "headers" if n < len(self.headers) else "oversign"
                yield key, f"{name!r} is not a header field name"
        if self.table and "from" not in {h.lower() for h in self.headers + self.oversign}:
            yield "headers", "From must be signed (RFC 6376 §5.4)"
        groups: dict[str, list[tuple[int, SigningKey]]] = {}
        for n, line in enumerate(self.table):
            groups.setdefault(line.match.lower(), []).append((n, line))
        for lines in groups.values():
            kinds: dict[str, int] = {}
            for n, line in lines:
                kind = table.algorithm_of(line.algorithm.value, line.key_file)
                if kind in kinds:
                    yield f"table[{n}]", (f"a second {kind} key for match {line.match!r} "
                                          f"(table[{kinds[kind]}] is one)")
                kinds.setdefault(kind, n)
            if "ed25519-sha256" in kinds and "rsa-sha256" not in kinds:
                n = kinds["ed25519-sha256"]
                yield f"table[{n}]", (f"an Ed25519 key for match {lines[0][1].match!r} "
                                      "needs an RSA key beside it: many receivers verify "
                                      "only RSA")
                return
        if self.table:
            # Every line checked (a problem ends the load before this): the
            # keys just read are the ones this config signs with.
            from . import keys
            keys.keep(self, {line.key_file: keys.load_key(line.key_file)
                             for line in self.table})

    def __reduce__(self):
        """Pickled for a worker process (runtime/supervisor.py hands each
        reload over so), the section takes the keys its load read: the
        worker signs with what the parent checked, and never reads a key
        file itself."""
        from . import keys
        loaded = keys.kept(self) or {}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return (_restore, (values, {path: keys.to_der(key) for path, key in loaded.items()}))


def _restore(values: dict, material: dict[str, bytes]) -> SigningConfig:
    from . import keys
    config = SigningConfig(**values)
    if material:
        keys.keep(config, {path: keys.from_der(data) for path, data in material.items()})
    return config
