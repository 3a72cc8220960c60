"""`policyd dkim genkey | test | rotate`: make a signing key and its DNS
record, check that the published record matches the key, and switch a
domain to a standby selector only once its record is seen in the DNS.

Exit statuses: 0 done or matching; 1 the record is missing, does not
match, or a rotation is not ready; 75 (EX_TEMPFAIL) the DNS did not answer
in time; 73 (EX_CANTCREAT) the key file cannot be written; 78 the config.
"""
from __future__ import annotations

import os
import pwd
import sys
from dataclasses import dataclass
from typing import TextIO

from ..config import Config
from ..dns import DnsTempError, Lookups, Resolver
from . import keys, record
from .keys import KeyFileError, PrivateKey

DEFAULT_DIRECTORY = "/etc/policyd/dkim"
SERVICE_USER = "policyd"

EX_CANTCREAT = 73   # sysexits.h
EX_TEMPFAIL = 75


@dataclass(frozen=True)
class Published:
    """What the DNS says of one selector, held against a key."""
    name: str
    status: str                  # record.Judgement's, or "temperror"
    problems: tuple[str, ...] = ()
    record: str = ""
    secure: bool = False         # DNSSEC-authenticated, by policyd's trust rule
    warnings: tuple[str, ...] = ()   # what works but should not stay so (t=y, RSA < 2048)


def check_published(resolver: Lookups, domain: str, selector: str, key: PrivateKey,
                    timeout: float) -> Published:
    """Does selector._domainkey.domain publish `key`'s public half?  One
    TXT question through policyd's resolver, bounded by `timeout`
    (`policyd check` asks the same)."""
    name = f"{selector}._domainkey.{domain}"
    try:
        lookup = resolver.query(name, "TXT", lifetime=timeout)
    except DnsTempError as error:
        return Published(name, "temperror", (f"the DNS did not answer: {error}",))
    # RFC 6376 §3.6.2.2: the strings of one TXT record are concatenated.
    texts = [b"".join(strings).decode("ascii", "replace") for strings in lookup.records]
    if not texts:
        return Published(name, "missing", ("no TXT record" if not lookup.nxdomain
                                           else "no such name (NXDOMAIN)",),
                         secure=lookup.secure)
    judged = record.judge(texts, key)
    return Published(name, judged.status, judged.problems, texts[0], lookup.secure,
                     judged.warnings)


def key_path(directory: str, domain: str, selector: str) -> str:
    return os.path.join(directory, f"{domain}.{selector}.key")


def _owner(name: str | None) -> tuple[int, int] | None:
    """(uid, gid) to give the key file: --owner, else the service user when
    run as root and it exists, else None (the caller's own)."""
    if name is None:
        if os.geteuid() != 0:
            return None
        name = SERVICE_USER
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
    else:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SystemExit(f"policyd: dkim: no such user: {name}") from None
    return entry.pw_uid, entry.pw_gid


def write_key_file(path: str, pem: bytes, owner: tuple[int, int] | None) -> None:
    """The key, 0600, owned by `owner`; never over an existing file (a new
    key gets a new selector: the old one signs mail still in transit)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o750)
        if owner is not None and os.geteuid() == 0:
            os.chown(directory, 0, owner[1])
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(descriptor, 0o600)    # whatever the umask
        if owner is not None:
            os.fchown(descriptor, *owner)
        os.write(descriptor, pem)
    except BaseException:
        os.close(descriptor)
        os.unlink(path)
        raise
    os.close(descriptor)


def genkey(domain: str, selector: str, key_type: str, bits: int, directory: str,
           owner_name: str | None, out: TextIO = sys.stdout) -> int:
    key, pem = keys.generate(key_type, bits)
    path = key_path(directory, domain, selector)
    owner = _owner(owner_name)
    try:
        write_key_file(path, pem, owner)
    except FileExistsError:
        print(f"policyd: dkim genkey: {path} exists; a new key takes a new selector",
              file=sys.stderr)
        return EX_CANTCREAT
    except OSError as error:
        print(f"policyd: dkim genkey: cannot write {path}: {error.strerror or error}",
              file=sys.stderr)
        return EX_CANTCREAT
    owned = (f"{pwd.getpwuid(owner[0]).pw_name}" if owner
             else pwd.getpwuid(os.geteuid()).pw_name)
    print(f"; {key.description} key written to {path} (mode 0600, owner {owned})", file=out)
    print("; publish this record in the zone of " + domain + ":", file=out)
    print(keys.zone_line(domain, selector, key.record()), file=out)
    print("; then add to signing.table in policyd.yaml:", file=out)
    print(f";   - {{match: {domain}, selector: {selector}, key_file: {path}}}", file=out)
    print(f"; and check it with: policyd dkim test {domain} {selector}", file=out)
    return 0


def _key_for(config: Config, domain: str, selector: str, key_file: str | None,
             directory: str) -> tuple[PrivateKey, str]:
    """The private key of domain/selector: --key-file, the config's table
    line, or the file genkey would have written."""
    if not key_file:
        for line in config.signing.table:
            if line.signing_domain == domain and line.selector.lower() == selector.lower():
                key_file = line.key_file
                break
    if not key_file:
        key_file = key_path(directory, domain, selector)
    return keys.load_key(key_file), key_file


def _report(published: Published, out: TextIO) -> None:
    dnssec = "with dnssec" if published.secure else "without dnssec"
    print(f"{published.name}: {published.status} ({dnssec})", file=out)
    for problem in published.problems:
        print(f"  {problem}", file=out)
    for warning in published.warnings:
        print(f"  warning: {warning}", file=out)


def _status(published: Published) -> int:
    return {"match": 0, "temperror": EX_TEMPFAIL}.get(published.status, 1)


def test(config: Config, domain: str, selector: str, key_file: str | None,
         directory: str, out: TextIO = sys.stdout) -> int:
    try:
        key, path = _key_for(config, domain, selector, key_file, directory)
    except KeyFileError as error:
        print(f"policyd: dkim test: {error}", file=sys.stderr)
        return 1
    resolver = Resolver(config.dns)
    published = check_published(resolver, domain, selector, key, config.dns.timeout)
    print(f"{domain} {selector}: {key.description} key {path}", file=out)
    _report(published, out)
    if published.status in ("missing", "mismatch", "unusable"):
        print("  publish:", keys.zone_line(domain, selector, key.record()), file=out)
    return _status(published)


def rotate(config: Config, domain: str, selector: str, key_type: str, bits: int,
           directory: str, owner_name: str | None, out: TextIO = sys.stdout) -> int:
    """Step by step, run again until it says to switch:
    1. no key for the new selector yet: make one, print its record;
    2. its record not (yet) in the DNS matching the key: say so, exit 1;
    3. published and matching: print the table line to change; exit 0."""
    path = key_path(directory, domain, selector)
    if not os.path.exists(path):
        status = genkey(domain, selector, key_type, bits, directory, owner_name, out)
        if status == 0:
            print(f"; rotation, step 1 of 3: publish the record above, wait for the "
                  f"TTL of the old one, then run policyd dkim rotate {domain} {selector} "
                  "again", file=out)
            return 1
        return status
    try:
        key = keys.load_key(path)
    except KeyFileError as error:
        print(f"policyd: dkim rotate: {error}", file=sys.stderr)
        return 1
    published = check_published(Resolver(config.dns), domain, selector, key,
                                config.dns.timeout)
    _report(published, out)
    if published.status != "match":
        print(f"; rotation, step 2 of 3: not switching to {selector} until its record is "
              "in the DNS and matches the key", file=out)
        return _status(published)
    current = [line for line in config.signing.table
               if line.signing_domain == domain and line.key_file != path]
    same_kind = [line for line in current
                 if keys.load_key(line.key_file).key_type == key.key_type]
    print(f"; rotation, step 3 of 3: {selector} is published and matches; in the "
          f"signing.table of {config.source} change", file=out)
    for line in same_kind or current[:1]:
        print(f";   {{match: {line.match}, selector: {line.selector}, key_file: "
              f"{line.key_file}}}", file=out)
    if not same_kind and not current:
        print(f";   (no {key.key_type} line for {domain} yet: add one)", file=out)
    print(f"; to {{match: {domain}, selector: {selector}, key_file: {path}}}", file=out)
    print("; then: policyd check-config && systemctl reload policyd.  Keep the old "
          "record published for a week (mail in transit and in queues is verified "
          "with it), then remove it.", file=out)
    return 0


def run(args) -> int:
    """The handler of `policyd dkim ...` (policyd/cli.py)."""
    from ..runtime.engines import load_config
    domain = args.domain.rstrip(".").lower()
    selector = args.selector
    if not keys.valid_selector(selector):
        print(f"policyd: dkim: {selector!r} is not a selector (RFC 6376 §3.1)",
              file=sys.stderr)
        return 64   # EX_USAGE
    directory = args.directory or DEFAULT_DIRECTORY
    try:
        if args.dkim_command == "genkey":
            return genkey(domain, selector, args.type, args.bits, directory, args.owner)
        config = load_config(args.config)
        if args.dkim_command == "test":
            return test(config, domain, selector, args.key_file, directory)
        return rotate(config, domain, selector, args.type, args.bits, directory, args.owner)
    except KeyFileError as error:
        print(f"policyd: dkim {args.dkim_command}: {error}", file=sys.stderr)
        return 1
