"""Where policyd's time goes: a summary of a py-spy profile.

    py-spy record --gil --format raw --pid PID -o FILE   (pip install py-spy)
    /usr/bin/python3 bench/policy_profile.py FILE

`--gil` samples only the thread holding the GIL.  Under load policyd is
bound by one core's worth of Python, so that is the time that limits
decisions/s, whichever thread spends it.  run_policy.py --profile FILE
records and summarizes in one go.
"""
from __future__ import annotations

import collections
import re
import sys

# Self time is charged to the first area whose pattern matches the file of
# the innermost frame.  Order matters: policyd's own modules before the
# libraries they sit on.
AREAS = [
    ("policyd policy front-end (protocol, server)", r"policyd/policy/"),
    ("policyd engine, checks, headers", r"policyd/(engine|checks|headers|model|config)"),
    ("policyd DNS layer", r"policyd/dns\.py"),
    ("policyd logging, metrics", r"policyd/(service|daemon|cli)\.py|(^|/)logging/"),
    ("pyspf", r"(^|/)spf\.py$"),
    ("dnspython", r"(^|/)dns/"),
    ("asyncio event loop", r"(^|/)(asyncio/|selectors\.py)"),
    ("thread pool hand-off", r"(^|/)(concurrent/futures/|threading\.py|queue\.py)"),
    ("ipaddress", r"(^|/)ipaddress\.py"),
    ("authres", r"(^|/)authres/"),
    ("enum, dataclasses, re", r"(^|/)(enum\.py|dataclasses\.py|re/)|^<string>$"),
]
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(:\d+)?\)$")


def parse(path: str) -> list[tuple[list[tuple[str, str]], int]]:
    """Collapsed stacks (py-spy --format raw): "frame;frame;... count"."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = []
            for text in stack.split(";"):
                match = _FRAME.match(text)
                frames.append((match["function"], match["file"]) if match else (text, ""))
            stacks.append((frames, int(count)))
    return stacks


def area_of(file: str) -> str:
    for name, pattern in AREAS:
        if re.search(pattern, file):
            return name
    return "other"


def short(function: str, file: str) -> str:
    """py-spy names files by module path already (dns/name.py); keep that."""
    for marker in ("/dist-packages/", "/site-packages/", "/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{function} ({file})"


def summarize(path: str, top: int = 15) -> str:
    stacks = parse(path)
    total = sum(count for _, count in stacks)
    if not total:
        return f"{path}: no samples"
    areas, own, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    for frames, count in stacks:
        function, file = frames[-1]
        areas[area_of(file)] += count
        own[short(function, file)] += count
        for name in {short(f, fl) for f, fl in frames}:
            inclusive[name] += count
    lines = [f"{total} samples with the GIL held", "", "| area (self time) | share |", "|---|---:|"]
    lines += [f"| {name} | {count / total:.0%} |" for name, count in areas.most_common()]
    lines += ["", "| function (self) | share |", "|---|---:|"]
    lines += [f"| {name} | {count / total:.1%} |" for name, count in own.most_common(top)]
    lines += ["", "| function (inclusive) | share |", "|---|---:|"]
    lines += [f"| {name} | {count / total:.0%} |" for name, count in inclusive.most_common(top * 2)
              if not name.startswith(("<module>", "_run_code", "_run_module_as_main",
                                      "Thread._bootstrap", "Thread.run", "run (",
                                      "process "))]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: policy_profile.py PY-SPY-RAW-FILE")
    print(summarize(sys.argv[1]))
