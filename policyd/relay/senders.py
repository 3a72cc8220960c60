"""Sender ownership: which SASL logins may use a MAIL FROM address
(SenderOwners), read as Postfix's sender_login_maps are (postconf(5)
smtpd_sender_login_maps, reject_sender_login_mismatch), and the readers
of the map files it looks in (load_map).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ..model import parse_mail_from


class MapError(Exception):
    """A map that cannot be read: the message names the file and line."""


_OWNER_SEPARATORS = re.compile(r"[,\s]+")


@dataclass(frozen=True)
class FixedTable:
    """hash:, texthash: and relay.senders: exact keys, lower case."""
    source: str
    entries: dict[str, str]

    fixed = True

    def get(self, key: str) -> str | None:
        return self.entries.get(key.lower())

    def owners(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key)
        return None if value is None else _split_owners(value)


@dataclass(frozen=True)
class _Rule:
    pattern: re.Pattern[str]
    negate: bool
    result: str | None       # None for "if"
    line: int


@dataclass(frozen=True)
class RegexpTable:
    """regexp_table(5): the first matching /pattern/ gives the result;
    if/endif blocks apply their rules only when their pattern matches."""
    source: str
    rules: tuple[tuple[str, object], ...]   # ("rule", _Rule) | ("if", _Rule) | ("endif", None)

    fixed = False

    def get(self, key: str) -> str | None:
        found = self._match(key)
        return None if found is None else _expand(*found)

    def owners(self, key: str) -> tuple[str, ...] | None:
        """The logins of the first matching rule.  The result is split into
        logins before $1.. are substituted, so that each substitution is one
        login: with `/^(.*)$/ ${1}`, the sender "bob,alice"@own.example
        (a quoted local part) is owned by the login "bob,alice@own.example"
        alone, not by "bob" (Postfix splits after substituting; stricter
        here, since the sender writes what is substituted)."""
        found = self._match(key)
        if found is None:
            return None
        result, match = found
        return tuple(owner for owner in (_expand(piece, match) for piece in
                                         _split_owners(result)) if owner)

    def _match(self, key: str) -> tuple[str, re.Match[str] | None] | None:
        """The first matching rule's result and match, None if none."""
        depth_skipped = 0   # nesting depth of an if whose pattern did not match
        depth = 0
        for kind, rule in self.rules:
            if kind == "endif":
                if depth_skipped and depth == depth_skipped:
                    depth_skipped = 0
                depth -= 1
                continue
            assert isinstance(rule, _Rule)
            if kind == "if":
                depth += 1
                if not depth_skipped and \
                        bool(rule.pattern.search(key)) == rule.negate:
                    depth_skipped = depth
                continue
            if depth_skipped:
                continue
            match = rule.pattern.search(key)
            if rule.negate:
                if match is None:
                    return rule.result or "", None
            elif match is not None:
                return rule.result or "", match
        return None


def _split_owners(value: str) -> tuple[str, ...]:
    return tuple(owner for owner in _OWNER_SEPARATORS.split(value) if owner)


def _expand(result: str, match: re.Match[str] | None) -> str:
    """$1..$9, ${1} and $$ as regexp_table(5) substitutes them (a negated
    pattern matched nothing: its result is taken as it is)."""
    if match is None:
        return result
    matched: re.Match[str] = match

    def one(found: re.Match[str]) -> str:
        if found.group() == "$$":
            return "$"
        number = int(found.group(1) or found.group(2))
        return matched.group(number) or "" if number <= (matched.re.groups) else ""
    return re.sub(r"\$\$|\$\{(\d+)\}|\$(\d)", one, result)


Table = FixedTable | RegexpTable


def _logical_lines(path: str) -> Iterable[tuple[int, str]]:
    """(line number, text): comments and blank lines dropped, a line that
    starts with white space joined to the one before (postmap(1))."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as stream:
            lines = stream.read().splitlines()
    except OSError as error:
        raise MapError(f"{path}: cannot read: {error.strerror or error}") from None
    current: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace() and current is not None:
            current = (current[0], current[1] + " " + stripped)
            continue
        if current is not None:
            yield current
        current = (number, stripped)
    if current is not None:
        yield current


def _fixed(source: str, path: str) -> FixedTable:
    entries: dict[str, str] = {}
    for number, line in _logical_lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise MapError(f"{path}, line {number}: expected 'key value'")
        key, value = parts
        entries.setdefault(key.lower(), value.strip())   # postmap: the first one counts
    return FixedTable(source, entries)


_REGEXP_LINE = re.compile(r"(?P<negate>!?)(?P<delim>[^\s\w!])(?P<pattern>.*?)(?<!\\)"
                          r"(?P=delim)(?P<flags>[imx]*)(?:\s+(?P<result>.*))?$", re.S)


def _pattern(text: str, flags: str, where: str) -> re.Pattern[str]:
    # regexp_table(5): case-insensitive unless "i" toggles it off.
    options = re.IGNORECASE
    for flag in flags:
        if flag == "i":
            options ^= re.IGNORECASE
        elif flag == "m":
            options |= re.MULTILINE
    try:
        return re.compile(text, options)
    except re.error as error:
        raise MapError(f"{where}: bad regular expression: {error}") from None


def _regexp(source: str, path: str) -> RegexpTable:
    rules: list[tuple[str, object]] = []
    depth = 0
    for number, line in _logical_lines(path):
        where = f"{path}, line {number}"
        if line.lower() == "endif":
            if not depth:
                raise MapError(f"{where}: endif without if")
            depth -= 1
            rules.append(("endif", None))
            continue
        kind = "rule"
        if line[:2].lower() == "if" and line[2:3].isspace():
            kind, line = "if", line[2:].lstrip()
        found = _REGEXP_LINE.match(line)
        if found is None:
            raise MapError(f"{where}: expected /pattern/ result")
        result = found.group("result")
        if kind == "rule" and not result:
            raise MapError(f"{where}: a pattern without a result")
        if kind == "if" and result:
            raise MapError(f"{where}: text after an if pattern")
        rule = _Rule(_pattern(found.group("pattern"), found.group("flags"), where),
                     bool(found.group("negate")), result.strip() if result else None, number)
        if kind == "if":
            depth += 1
        rules.append((kind, rule))
    if depth:
        raise MapError(f"{path}: if without endif")
    return RegexpTable(source, tuple(rules))


def load_map(source: str) -> Table:
    """One `type:path` source; raises MapError.

    Tables are Postfix's own text formats, so an existing map works as it
    is: hash:/texthash: source files as postmap(1) reads them ("key value",
    `#` comments, a line starting with white space continues the one
    before, keys folded to lower case) and regexp_table(5) files."""
    kind, colon, path = source.partition(":")
    if not colon or not path.startswith("/"):
        raise MapError(f"{source!r} is not TYPE:/absolute/path (hash, texthash, regexp)")
    if kind in ("hash", "texthash"):
        return _fixed(source, path)
    if kind == "regexp":
        return _regexp(source, path)
    raise MapError(f"{source!r}: type {kind!r} is not one of hash, texthash, regexp")


def config_table(senders) -> FixedTable:
    """relay.senders as a table: address -> the logins that own it."""
    owners: dict[str, list[str]] = {}
    for entry in senders:
        for address in entry.addresses:
            owners.setdefault(address.lower(), []).append(entry.login)
    return FixedTable("relay.senders", {key: ",".join(logins) for key, logins in owners.items()})


class SenderOwners:
    """Which logins own a sender address, over every table in order."""

    def __init__(self, tables: tuple[Table, ...], delimiter: str,
                 local_domains: tuple[str, ...]):
        self.tables = tables
        self.delimiter = delimiter
        self.local_domains = frozenset(local_domains)

    def owners(self, sender: str) -> tuple[str, ...] | None:
        """The owning logins of a non-null MAIL FROM (internal form), None
        when no table lists it (nor its domain).

        The lookup order is mail_addr_find's: the whole address in every
        table, then, in the tables of fixed strings only (hash, texthash
        and relay.senders), the address without its extension (user+tag@
        is user@), the local part alone when the domain is one of
        relay.local_domains, and @domain.

        The address looked up is the one the engine reads everywhere else
        (model.parse_mail_from, Postfix's internal form): never a second
        reading of the sender's domain."""
        parsed = parse_mail_from(sender)
        if not parsed.domain:
            return None
        local, domain = parsed.local, parsed.domain
        full = f"{local}@{domain}"
        keys = [full]
        bare = local
        if self.delimiter and self.delimiter in local:
            bare = local.split(self.delimiter, 1)[0]
            if bare:
                keys.append(f"{bare}@{domain}")
        if domain in self.local_domains:
            keys.append(local)
            if bare != local and bare:
                keys.append(bare)
        keys.append("@" + domain)
        for index, key in enumerate(keys):
            for table in self.tables:
                if index and not table.fixed:
                    continue   # mail_addr_find: partial keys for fixed-string tables only
                owners = table.owners(key)
                if owners is not None:
                    return owners
        return None

    def owned_by(self, sender: str, login: str) -> bool | None:
        """True when `login` owns `sender`, False when others do (or it has
        no usable domain), None when nobody is listed for it."""
        owners = self.owners(sender)
        if owners is None:
            return None if parse_mail_from(sender).domain else False
        folded = login.casefold()
        return any(owner.casefold() == folded for owner in owners)
