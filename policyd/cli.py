"""policyd serve | milter | check | check-config | dump-config | query | dkim"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from . import __version__
from . import config as config_module
from .config import ConfigError, EX_CONFIG
from .model import Request
from .runtime.engines import build_engine, load_config
from .service import decision_line, raise_descriptor_limit, setup_logging

log = logging.getLogger("policyd")


def _cmd_check_config(args) -> int:
    config = load_config(args.config)
    print(f"policyd: {config.source}: ok")
    return 0


def _cmd_dump_config(args) -> int:
    sys.stdout.write(config_module.dump(load_config(args.config)))
    return 0


def _request_from_args(args) -> Request:
    try:
        address = config_module.normalize_address(ipaddress.ip_address(
            args.client_address.removeprefix("IPv6:").removeprefix("ipv6:")))
    except ValueError:
        raise SystemExit(f"policyd: query: {args.client_address!r} is not an IP address")
    return Request(client_address=address, helo=args.helo or "", sender=args.sender or "",
                   recipient=args.recipient or "", queue_id=args.queue_id or "",
                   sasl_username=args.sasl_username or "", client_name=args.client_name,
                   reverse_client_name=args.reverse_client_name)


def _request_from_stdin() -> Request:
    from .policy.protocol import ProtocolError, RequestReader, request_from_attributes
    limits = config_module.PolicyConfig()
    reader = RequestReader(max_line_length=limits.max_line_length,
                           max_attributes=limits.max_attributes,
                           max_request_size=limits.max_request_size)
    data = sys.stdin.buffer.read()
    if not data.endswith(b"\n\n"):
        data = data.rstrip(b"\n") + b"\n\n"
    try:
        requests = reader.feed(data)
        if not requests:
            raise ProtocolError("no complete request on standard input")
        return request_from_attributes(requests[0])
    except ProtocolError as error:
        raise SystemExit(f"policyd: query: {error}")


def _cmd_query(args) -> int:
    config = load_config(args.config)
    setup_logging("warning")
    request = _request_from_args(args) if args.client_address else _request_from_stdin()
    decision = build_engine(config).decide(request)
    for line in decision.trace:
        print(f"  {line}")
    if decision.reply:
        print(f"action={decision.reply.code} {decision.reply.status} {decision.reply.text}")
    else:
        print("action=DUNNO" if not decision.headers else
              f"action=PREPEND {decision.headers[0]}")
    for header in decision.headers[1:]:
        print(f"header: {header}")
    print(f"log: {decision_line(request, decision)}")
    return 0


def _cmd_check(args) -> int:
    from .doctor.command import run
    return run(args)


def _cmd_dkim(args) -> int:
    from .signing.command import run
    return run(args)


def _cmd_serve(args) -> int:
    from .policy.service import serve
    config = load_config(args.config)
    setup_logging(config.log_level)
    raise_descriptor_limit()
    also = []
    if config.routing.listen:
        # The socketmap of outbound routes (issue 13), beside the policy
        # service under its supervisor.
        from .routing.service import RoutingWorkers
        also.append(RoutingWorkers(config))
    return serve(args.config, config, user=args.user,
                 companion=_milter_companion(args) if args.milter else None, also=also)


def _cmd_routes(args) -> int:
    from .routing.command import run
    return run(args)


def _milter_companion(args):
    """`serve --milter`: the milter as a process of its own beside the
    policy service (libmilter owns SIGHUP in its process, which the policy
    service reloads on); the two front-ends meet here, not in each other."""
    import signal
    from .runtime.supervisor import Companion
    command = [sys.executable, "-m", "policyd", "milter"]
    if args.config:
        command += ["-c", args.config]
    if args.user:
        command += ["--user", args.user]
    return Companion(command, stop_timeout=lambda config: config.milter.drain_timeout + 5,
                     name="milter", reload_signal=signal.SIGUSR1)


def _cmd_milter(args) -> int:
    from .milter.service import run
    config = load_config(args.config)
    setup_logging(config.log_level)
    raise_descriptor_limit()
    return run(args.config, config, user=args.user)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help=f"YAML config (default {config_module.DEFAULT_PATH} "
                             "if it exists, else the embedded default)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="policyd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, handler, help):
        sub = commands.add_parser(name, help=help)
        _config_option(sub)
        sub.set_defaults(handler=handler)
        return sub

    serve = command("serve", _cmd_serve, "run the Postfix policy service")
    serve.add_argument("--user", help="drop privileges to this user after binding")
    serve.add_argument("--milter", action="store_true",
                       help="also run the milter (`policyd milter`) as a child process")
    milter = command("milter", _cmd_milter, "run the milter only")
    milter.add_argument("--user", help="drop privileges to this user after binding")
    command("check-config", _cmd_check_config, "validate the config and exit")
    command("dump-config", _cmd_dump_config, "print the effective config")
    check = command("check", _cmd_check,
                    "check this deployment's mail DNS: resolver, own domains, "
                    "public addresses, Postfix wiring; say each fix")
    check.add_argument("domains", nargs="*", metavar="DOMAIN",
                       help="domains to check (default: nat.own_domains)")
    check.add_argument("--address", action="append", default=[], metavar="IP",
                       help="a public address to check (default: nat.public_addresses)")
    check.add_argument("--dkim-selector", action="append", default=[], metavar="SELECTOR",
                       help="a DKIM selector to check for each domain")
    check.add_argument("--dkim-key", action="append", default=[],
                       metavar="[DOMAIN:]SELECTOR:FILE",
                       help="a DKIM private key (PEM) to match against its selector's record")
    check.add_argument("--probe-signed", metavar="NAME",
                       help="a DNSSEC-signed name the resolver must answer with AD "
                            "(default: the root zone's SOA)")
    check.add_argument("--probe-bogus", metavar="NAME",
                       help="a name whose signature is known broken: a validating "
                            "resolver must fail it (default: dnssec-failed.org)")
    check.add_argument("--postfix-config", metavar="DIR",
                       help="the Postfix config directory for the wiring check "
                            "(postconf -c DIR; default: Postfix's own)")
    check.add_argument("--mta-sts-policy", metavar="FILE",
                       help="the MTA-STS policy file served at "
                            "https://mta-sts.DOMAIN/.well-known/mta-sts.txt, to check its mx: lines")
    check.add_argument("--json", action="store_true", help="findings as JSON, for monitoring")
    dkim = commands.add_parser("dkim", help="DKIM signing keys: make one, check its "
                               "DNS record, rotate to a new selector")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", required=True)
    for name, help_text in (
            ("genkey", "write a new private key and print its DNS TXT record"),
            ("test", "check that the published record matches the key"),
            ("rotate", "make a standby key for a new selector; once its record is "
                       "published and matches, say which table line to switch")):
        sub = dkim_commands.add_parser(name, help=help_text)
        sub.add_argument("domain", metavar="DOMAIN", help="the signing domain (d=)")
        sub.add_argument("selector", metavar="SELECTOR", help="the selector (s=)")
        sub.set_defaults(handler=_cmd_dkim)
        if name != "genkey":
            _config_option(sub)
        if name != "test":
            sub.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                             help="the key type (default %(default)s)")
            sub.add_argument("--bits", type=int, default=2048, metavar="N",
                             help="RSA key size (default %(default)s)")
            sub.add_argument("--owner", metavar="USER",
                             help="owner of the key file (default: policyd when run as "
                                  "root, else the caller)")
        else:
            sub.add_argument("--key-file", metavar="FILE",
                             help="the private key (default: the signing.table line "
                                  "of DOMAIN and SELECTOR, else the file genkey writes)")
        sub.add_argument("--directory", metavar="DIR",
                         help="where keys are written as DOMAIN.SELECTOR.key "
                              "(default /etc/policyd/dkim)")
    routes = command("routes", _cmd_routes,
                     "list, add or forget IPv4-only delivery routes (routing:)")
    from .routing.command import add_arguments as routes_arguments
    routes_arguments(routes)
    query = command("query", _cmd_query,
                    "decide one request (flags, or Postfix attributes on stdin) "
                    "and show why")
    query.add_argument("--client-address")
    query.add_argument("--helo")
    query.add_argument("--sender")
    query.add_argument("--recipient")
    query.add_argument("--queue-id")
    query.add_argument("--sasl-username")
    query.add_argument("--client-name", help="Postfix client_name (FCrDNS name or unknown)")
    query.add_argument("--reverse-client-name", help="Postfix reverse_client_name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"policyd: fatal: {error}", file=sys.stderr)
        return EX_CONFIG
