"""The man pages policyd(8) and policyd.yaml(5), made from the program
itself: the subcommands and options from the command line parser, the
keys and their defaults from the config schema (policyd/config.py).  A
key without a description here is an error, so the pages cannot leave
out what `policyd dump-config` prints.

    python3 -m policyd.manual DIRECTORY     # writes policyd.8, policyd.yaml.5
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import typing
from pathlib import Path

from . import __version__
from . import config as config_module

# What each key means, by dotted key.  spf.mailfrom.on_* and spf.helo.on_*
# are described by _spf_action below.
KEYS: dict[str, str] = {
    "authserv_id": "The authserv-id of the Authentication-Results header "
                   "(RFC 8601 \u00a72.5), a single token; empty: this host's FQDN.  The "
                   "milter removes incoming Authentication-Results fields that carry it.",
    "test_mode": "Log and add headers as usual, but never reject or defer: the log "
                 "says would=REJECT.",
    "log_level": "debug, info (a line per decision), warning or error.",
    "headers.authentication_results": "Add an Authentication-Results header "
                                      "(RFC 8601).",
    "headers.received_spf": "Add a Received-SPF header (RFC 7208 \u00a79.1) as well; "
                            "with the policy service, list it in "
                            "smtpd_data_restrictions too.",
    "dns.nameservers": "The resolvers asked, a list of IP addresses; empty: those of "
                       "dns.resolv_conf.  A local validating resolver (unbound) is "
                       "advised.",
    "dns.port": "Their port.",
    "dns.resolv_conf": "The file read for nameservers when dns.nameservers is empty, "
                       "and for options trust-ad.",
    "dns.timeout": "Seconds one decision stage (RCPT, end of message) may wait for "
                   "DNS answers that do not come, retries included; then its lookups "
                   "are temperror. Answers that come cost it nothing, however slow "
                   "(spf.lookup_time_limit bounds those).",
    "dns.trust_ad": "When the AD bit (DNSSEC) is believed: auto (every nameserver on "
                    "loopback, or options trust-ad in dns.resolv_conf), yes or no.",
    "dns.cache_size": "Answers kept per process (a quarter as many denials); 0: no "
                      "cache.",
    "spf.enabled": "Check SPF at all.",
    "spf.helo.check": "Check the HELO name too (reported as smtp.helo only, never as "
                      "the MAIL FROM result).",
    "spf.lookup_time_limit": "Seconds one SPF evaluation may take (RFC 7208 \u00a74.6.4).",
    "spf.void_lookup_limit": "Lookups with empty answers one evaluation may make "
                             "(RFC 7208 \u00a74.6.4).",
    "nat.own_domains": "Own domains whose mail may come back through NAT (matched at "
                       "label boundaries, subdomains included).",
    "nat.networks": "The inside networks that mail through NAT comes from.",
    "nat.public_addresses": "The server's public addresses: SPF for own-domain mail "
                            "from nat.networks is evaluated as if it came from these.",
    "nat.mode": "reevaluate (SPF as from nat.public_addresses) or pass (own-domain "
                "mail from nat.networks passes without an evaluation).",
    "iprev.ipv6": "Check reverse DNS (RFC 8601 iprev) of IPv6 clients.",
    "iprev.ipv4": "Check reverse DNS of IPv4 clients.",
    "iprev.on_fail": "What a client without a forward-confirmed PTR name does: reject, "
                     "defer, flag or none.",
    "iprev.on_temperror": "What a DNS failure during the iprev check does.",
    "iprev.reject_text": "The text of an iprev reject.",
    "allowlist": "Client networks that get no SPF or iprev checks.",
    "redis.url": "The Redis server that keeps state shared by every process and host "
                 "(rate limits, learned routes): redis://HOST:PORT/DB, rediss:// (TLS) or "
                 "unix:///PATH; empty: none, and the features that need it say so at start.",
    "redis.timeout": "Seconds one Redis command may take; a dead or slow Redis then gets "
                     "the feature's own fallback, and is not asked again for a few seconds.",
    "redis.key_prefix": "The prefix of every key policyd writes, so that several "
                        "deployments can share one Redis.",
    "policy.listen": "The policy service's sockets: inet:HOST:PORT or unix:PATH, a "
                     "list.",
    "policy.socket_mode": "The mode of a unix: socket, in octal.",
    "policy.socket_group": "The group a unix: socket is given (chown); empty: none.",
    "policy.max_line_length": "Octets one attribute line may have; a longer one "
                              "closes the connection, and Postfix applies its "
                              "default_action.  Keep it above Postfix's "
                              "line_length_limit (2048) with room for the attribute's "
                              "name: a client chooses its HELO name's length.",
    "policy.max_attributes": "Attributes one request may have.",
    "policy.max_request_size": "Octets one request may have.",
    "policy.idle_timeout": "Seconds an idle connection is kept (Postfix closes its "
                           "own after 300).",
    "policy.request_timeout": "Seconds a request may take to arrive, from its first "
                              "octet.",
    "policy.workers": "Threads per process for decisions that wait on DNS.",
    "policy.processes": "Worker processes sharing the sockets.",
    "policy.drain_timeout": "Seconds requests in flight get to finish at a stop.",
    "milter.listen": "The milter's socket, as libmilter writes it: inet:PORT@HOST, "
                     "inet6:PORT@HOST or unix:PATH.",
    "milter.workers": "Processes serving the milter socket.",
    "milter.timeout": "Seconds libmilter waits for the MTA.",
    "milter.drain_timeout": "Seconds sessions in flight get to finish at a stop.",
    "milter.socket_mode": "The mode of a unix: socket, in octal.",
    "milter.socket_group": "The group a unix: socket is given (chown); empty: none.",
    "milter.dkim.verify": "Verify DKIM signatures at end of message.",
    "milter.dkim.nat_requires_aligned_pass": "What own-domain mail accepted through "
                                             "the NAT rule without an aligned DKIM pass "
                                             "does: reject, defer or flag.",
    "milter.dkim.max_held_bytes": "Octets of one message held in memory for DKIM; a "
                                  "body past it is hashed as it arrives.",
    "metrics.listen": "HOST:PORT for Prometheus metrics at /metrics; empty: off.",
}

# policyd.yaml(5)'s example: a local resolver and the NAT rule.
EXAMPLE = """dns:
  nameservers: [127.0.0.1]
nat:
  own_domains: [example.org]
  networks: [192.168.1.0/24]
  public_addresses: [203.0.113.7]"""

SPF_RESULTS = {"pass": "pass", "fail": "fail", "softfail": "softfail",
               "neutral": "neutral", "none": "none (no SPF record)",
               "permerror": "permerror (a broken record)",
               "temperror": "temperror (a DNS failure)"}


def _spf_action(key: str) -> str | None:
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != "spf" or not parts[2].startswith("on_"):
        return None
    identity = {"mailfrom": "MAIL FROM", "helo": "HELO"}[parts[1]]
    result = parts[2].removeprefix("on_")
    if result == "malformed":
        return ("What a MAIL FROM without a usable domain does (a bare local part, "
                "which Postfix would qualify with $myorigin).")
    return (f"What an SPF result of {SPF_RESULTS[result]} for the {identity} identity "
            "does: reject, defer, flag (accept; say it in the headers and the log) or "
            "none.")


def keys(cls=config_module.Config, prefix: str = "") -> list[tuple[str, object]]:
    """Every key of the schema, dotted, with its default, in the order
    dump-config prints them."""
    hints = typing.get_type_hints(cls)
    found = []
    for field in dataclasses.fields(cls):
        if field.name == "source":
            continue
        key = f"{prefix}{field.name}"
        default = getattr(cls(), field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            found += keys(hints[field.name], key + ".")
        else:
            found.append((key, default))
    return found


def _field_doc(key: str) -> str | None:
    """The `doc` metadata of a key's field (the sections of features say it there)."""
    cls: object = config_module.Config
    field = None
    for name in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        field = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        if field is None:
            return None
        cls = typing.get_type_hints(cls)[name]
    return field.metadata.get("doc") if field else None


def describe(key: str) -> str:
    text = KEYS.get(key) or _field_doc(key) or _spf_action(key)
    if not text:
        raise KeyError(f"policyd/manual.py: no description of the config key {key}")
    return text


def _roff(text: str) -> str:
    """Text as roff: backslashes and minus signs escaped, no line that
    starts with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line
                     for line in text.splitlines())


def _default(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value"):   # Verdict
        return str(value.value)
    return '""' if value == "" else str(value)


def _header(name: str, section: int, title: str) -> list[str]:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
            .strftime("%Y-%m-%d") if epoch else "")
    return [f'.TH {name.upper()} {section} "{date}" "policyd {__version__}" "{title}"',
            ".SH NAME", f"{_roff(name)} \\- {_roff(title)}"]


def config_page() -> str:
    lines = _header("policyd.yaml", 5, "policyd configuration")
    lines += [".SH DESCRIPTION", _roff(
        "policyd reads one YAML file, /etc/policyd/policyd.yaml unless -c names "
        "another.  Every key is optional; a key not given has the default below.  "
        "The file is strictly validated: an unknown key, a wrong type or a bad "
        "value stops policyd with the file, the line and the key, and exit status "
        f"{config_module.EX_CONFIG}.  Keys are written here with dots for nesting: dns.timeout is timeout "
        "in the mapping dns.  policyd dump-config prints every key with its "
        "effective value."),
        ".SH KEYS"]
    for key, default in keys():
        lines += [".TP", f"\\fB{_roff(key)}\\fR (default: {_roff(_default(default))})",
                  _roff(describe(key))]
    lines += [".SH EXAMPLE", ".nf", _roff(EXAMPLE), ".fi", ".SH SEE ALSO", "\\fBpolicyd\\fR(8)"]
    return "\n".join(lines) + "\n"


def _command_parsers() -> list[tuple[str, str, argparse.ArgumentParser]]:
    """Each command's name, help and parser; a command with subcommands of
    its own (dkim) as one entry per subcommand, named "dkim genkey"."""
    from .cli import _parser

    def subcommands(parser: argparse.ArgumentParser):
        return [action for action in parser._actions
                if isinstance(action, argparse._SubParsersAction)]
    [subparsers] = subcommands(_parser())
    helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
    found = []
    for name, parser in subparsers.choices.items():
        nested = subcommands(parser)
        if not nested:
            found.append((name, helps.get(name) or "", parser))
            continue
        nested_helps = {choice.dest: choice.help for choice in nested[0]._choices_actions}
        found += [(f"{name} {sub_name}", nested_helps.get(sub_name) or "", sub_parser)
                  for sub_name, sub_parser in nested[0].choices.items()]
    return found


def _commands() -> list[tuple[str, str, list[argparse.Action]]]:
    return [(name, help_text, [a for a in parser._actions
                               if a.option_strings and a.dest != "help"])
            for name, help_text, parser in _command_parsers()]


def _operands(name: str) -> list[argparse.Action]:
    """The positional arguments of a subcommand of a command (dkim genkey
    DOMAIN SELECTOR); those of the top-level commands are in their text."""
    if " " not in name:
        return []
    for found, _, parser in _command_parsers():
        if found == name:
            return [a for a in parser._actions
                    if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    return []


def _option_help(option: argparse.Action) -> str:
    if option.help:
        return option.help % {"default": option.default}
    # query's request attributes, which need no more than their name.
    return f"The request's {option.dest.replace('_', ' ')}."


def _metavar(option: argparse.Action) -> str:
    # A tuple metavar (one name per argument) is not used by any option.
    return option.metavar if isinstance(option.metavar, str) and option.metavar \
        else option.dest.upper()


def _usage(name: str, options: list[argparse.Action]) -> str:
    parts = [f"\\fBpolicyd {_roff(name)}\\fR"]
    parts += [f"\\fI{_roff(_metavar(operand))}\\fR" for operand in _operands(name)]
    for option in options:
        flag = _roff(option.option_strings[0])
        parts.append(f"[\\fB{flag}\\fR]" if option.nargs == 0 else
                     f"[\\fB{flag}\\fR \\fI{_roff(_metavar(option))}\\fR]")
    return " ".join(parts)


def program_page() -> str:
    from .runtime.exits import EX_NOUSER, EX_SOFTWARE, EX_UNAVAILABLE
    lines = _header("policyd", 8, "SPF, iprev and DKIM policy for Postfix and Sendmail")
    commands = _commands()
    lines += [".SH SYNOPSIS"]
    for name, _, options in commands:
        lines += [_usage(name, options), ".br"]
    lines += [".SH DESCRIPTION", _roff(
        "policyd checks SPF (RFC 7208), reverse DNS (RFC 8601 iprev) and DKIM for "
        "the mail a server receives.  It answers as a Postfix policy-delegation "
        "service (check_policy_service) and as a milter (Postfix smtpd_milters, "
        "Sendmail INPUT_MAIL_FILTER), both over one decision engine."),
        ".SH COMMANDS"]
    for name, help_text, options in commands:
        lines += [".TP", f"\\fB{_roff(name)}\\fR", _roff(help_text[:1].upper() + help_text[1:]
                                                        + ".")]
        for operand in _operands(name):
            lines += [".RS", ".TP", f"\\fI{_roff(_metavar(operand))}\\fR",
                      _roff(_option_help(operand)), ".RE"]
        for option in options:
            flags = ", ".join(f"\\fB{_roff(flag)}\\fR" for flag in option.option_strings)
            lines += [".RS", ".TP", flags if option.nargs == 0 else
                      f"{flags} \\fI{_roff(_metavar(option))}\\fR",
                      _roff(_option_help(option)), ".RE"]
    lines += [".SH SIGNALS", ".TP", "\\fBSIGHUP\\fR", _roff(
        "policyd serve reloads: the file is read and validated first; a bad file "
        "keeps the running config and is logged in one line.  With --milter the "
        "milter is passed the reload as SIGUSR1.  policyd milter alone stops on it, "
        "as libmilter does."),
        ".TP", "\\fBSIGUSR1\\fR", _roff(
        "policyd milter reloads (libmilter takes SIGHUP as stop); policyd serve "
        "takes it as SIGHUP."),
        ".TP", "\\fBSIGTERM\\fR, \\fBSIGINT\\fR", _roff(
        "Stop accepting, let what is in flight finish (policy.drain_timeout, "
        "milter.drain_timeout), exit 0.")]
    lines += [".SH EXIT STATUS", ".TP", "0", "Stopped by a signal, or the command "
              "succeeded.", ".TP", "1", _roff("The milter started by serve --milter "
                                             "failed."),
              ".TP", str(EX_NOUSER), _roff("--user names no user (EX_NOUSER)."),
              ".TP", str(EX_UNAVAILABLE),
              _roff("A listen address cannot be used (EX_UNAVAILABLE)."),
              ".TP", str(EX_SOFTWARE),
              _roff("Workers kept dying, or one failed while stopping (EX_SOFTWARE)."),
              ".TP", str(config_module.EX_CONFIG),
              _roff("The config is not valid (EX_CONFIG); a service manager should "
                    "not restart.")]
    lines += [".SH FILES", ".TP", _roff(config_module.DEFAULT_PATH),
              _roff("The config, used when -c is not given and the file exists; "
                    "otherwise the embedded default."),
              ".TP", _roff("/var/spool/postfix/policyd/"),
              _roff("The Debian package's sockets, reached by a chrooted Postfix as "
                    "unix:private/policyd and unix:private/policyd-milter."),
              ".TP", _roff("/lib/systemd/system/policyd.service"),
              _roff("The service: policyd serve --milter as the user policyd."),
              ".SH SEE ALSO", "\\fBpolicyd.yaml\\fR(5), \\fBpostconf\\fR(5)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m policyd.manual DIRECTORY", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policyd.8").write_text(program_page(), encoding="utf-8")
    (directory / "policyd.yaml.5").write_text(config_page(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
