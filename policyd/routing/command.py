"""`policyd routes [list|add|forget]`: the IPv4-only routes, static
(routing: in the config) and learned (in Redis; without redis.url they
live in the serving process's memory, out of this command's reach)."""
from __future__ import annotations

import argparse
import datetime
import sys
import time

from ..config import ConfigError
from ..runtime.engines import load_config
from ..runtime.exits import EX_UNAVAILABLE
from ..state import SharedState, StateUnavailable
from .store import RedisStore, Route

EX_USAGE = 64   # sysexits.h
EX_DATAERR = 65

_NO_REDIS = ("learned routes live in the serving process's memory without redis.url "
             "(routing: and redis: in the config); set redis.url to list, add and "
             "forget them")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="routes_action")
    listing = actions.add_parser("list", help="static and learned routes (the default)")
    add = actions.add_parser("add", help="add a learned-style route by hand")
    add.add_argument("destination", help="an MX host name or a recipient domain")
    add.add_argument("--ttl", type=int, default=None, metavar="SECONDS",
                     help="how long it is kept (default routing.learned_ttl)")
    forget = actions.add_parser("forget", help="forget a learned route")
    forget.add_argument("destination")
    for action in (listing, add, forget):
        # `policyd routes list -c FILE` as well as `policyd routes -c FILE
        # list`; SUPPRESS: not given here, the one before the action stays.
        action.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                            help="YAML config (as for `policyd routes -c`)")


def _stamp(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%SZ")


def _destination(text: str) -> str | None:
    from ..config import _DOMAIN   # the config's own reading of a domain name
    name = text.rstrip(".").lower()
    return name if _DOMAIN.match(name) else None


def run(args) -> int:
    try:
        config = load_config(getattr(args, "config", None))
    except ConfigError as error:
        print(f"policyd: fatal: {error}", file=sys.stderr)
        return 78
    action = getattr(args, "routes_action", None) or "list"
    state = SharedState(config.redis) if config.redis.url else None
    store = RedisStore(state, config.routing.max_routes) if state is not None else None
    out = sys.stdout
    try:
        if action == "list":
            routing = config.routing
            if routing.ipv4_only:
                print("static\t*\t(routing.ipv4_only: all outbound mail)", file=out)
            for domain in routing.ipv4_only_domains:
                print(f"static\t{domain}\t(routing.ipv4_only_domains)", file=out)
            for host in routing.ipv4_only_hosts:
                print(f"static\t{host}\t(routing.ipv4_only_hosts)", file=out)
            if store is None:
                print(f"policyd: routes: {_NO_REDIS}", file=sys.stderr)
                return 0
            for route in store.routes():
                print(f"learned\t{route.destination}\tuntil {_stamp(route.expires)}\t"
                      f"learned {_stamp(route.learned)}\t{route.evidence}", file=out)
            return 0
        if store is None:
            print(f"policyd: routes: {_NO_REDIS}", file=sys.stderr)
            return EX_UNAVAILABLE
        destination = _destination(args.destination)
        if destination is None:
            print(f"policyd: routes: {args.destination!r} is not a host or domain name",
                  file=sys.stderr)
            return EX_DATAERR
        if action == "add":
            ttl = args.ttl if args.ttl is not None else config.routing.learned_ttl
            if ttl <= 0:
                print("policyd: routes: --ttl must be > 0", file=sys.stderr)
                return EX_USAGE
            now = time.time()
            store.add(Route(destination, now, now + ttl, "added by hand"))
            # add() keeps a route Redis did not take in memory; this
            # process ends, so make sure it is there.
            stored = store.key(destination)
            if store.state.run(lambda client: client.exists(stored)) != 1:
                raise StateUnavailable("not stored")
            print(f"added {destination} until {_stamp(now + ttl)}", file=out)
            return 0
        if action == "forget":
            if store.forget(destination):
                print(f"forgot {destination}", file=out)
                return 0
            print(f"policyd: routes: no learned route for {destination}", file=sys.stderr)
            return 1
    except StateUnavailable:
        print(f"policyd: routes: redis {config.redis.url} is unavailable", file=sys.stderr)
        return EX_UNAVAILABLE
    finally:
        if state is not None:
            state.close()
    print(f"policyd: routes: unknown action {action!r}", file=sys.stderr)
    return EX_USAGE
