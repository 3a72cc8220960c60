"""Two real verifiers for the signatures policyd makes: dkimpy and
OpenDKIM (opendkim -t, the filter's own code in test mode, reading the
public keys from a file instead of the DNS: TestPublicKeys)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import dkim

from policyd.model import Header

OPENDKIM = "/usr/sbin/opendkim"


def message(signatures: tuple[Header, ...], fields: list[tuple[str, str]], body: bytes,
            extra_top: list[tuple[str, str]] = ()) -> bytes:
    """The message as the MTA writes it after the milter: our fields at the
    top (their "\\n\\t" folding as CRLF), then the others."""
    head = b""
    for name, value in list(extra_top):
        head += f"{name}: {value}\r\n".encode()
    for header in signatures:
        head += f"{header.name}: {header.value}".replace("\n", "\r\n").encode() + b"\r\n"
    for name, value in fields:
        head += f"{name}:{value}".replace("\n", "\r\n").encode() + b"\r\n"
    return head + b"\r\n" + body


def dkimpy_results(data: bytes, records: dict[str, str]) -> list[bool]:
    def dnsfunc(name, timeout=5):
        found = records.get(name.decode().rstrip("."))
        return found.encode() if found else None
    verifier = dkim.DKIM(data)
    count = sum(1 for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")
                if line.lower().startswith(b"dkim-signature:"))
    results = []
    for n in range(count):
        try:
            results.append(verifier.verify(idx=n, dnsfunc=dnsfunc))
        except dkim.ValidationError:   # dkimpy raises for a body hash mismatch
            results.append(False)
    return results


def opendkim_results(data: bytes, records: dict[str, str], directory: Path) -> list[str]:
    """Each signature's result as OpenDKIM writes it in its
    Authentication-Results: "pass s=r1", "fail s=e1", ..."""
    if shutil.which(OPENDKIM) is None:
        raise AssertionError("opendkim not installed: apt-get install opendkim")
    directory.mkdir(exist_ok=True)
    (directory / "keys").write_text("".join(f"{name} {record}\n"
                                            for name, record in records.items()))
    (directory / "opendkim.conf").write_text(
        f"Mode v\nTestPublicKeys {directory / 'keys'}\nSyslog no\nAlwaysAddARHeader yes\n"
        "MinimumKeyBits 1024\n")
    (directory / "message").write_bytes(data)
    run = subprocess.run([OPENDKIM, "-x", str(directory / "opendkim.conf"), "-vvv",
                          "-t", str(directory / "message")],
                         capture_output=True, text=True, timeout=30)
    output = run.stdout + run.stderr
    match = re.search(r"hname='Authentication-Results' hvalue='(.*?)'", output, re.S)
    if not match:
        raise AssertionError(f"no result from opendkim:\n{output}")
    return [f"{m.group(1)} s={m.group(2)}" for m in
            re.finditer(r"dkim=(\w+)[^;]*?header\.s=([\w.-]+)", match.group(1))]
