"""What both daemons share: logging, the decision log line, metrics,
privilege drop."""
from __future__ import annotations

import logging
import os
import pwd
import re
import resource
import sys
from typing import TYPE_CHECKING

from .model import Decision, Request

if TYPE_CHECKING:   # for the annotations only: dns is not needed to log
    from .dns import EngineResolver

log = logging.getLogger("policyd")

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def setup_logging(level: str) -> None:
    # What the format does not show is not gathered for every record (the
    # logging HOWTO, "Optimization"): the caller's file and line (a walk
    # up the stack), the thread's and the multiprocessing process's names.
    # With a line per decision, they add up.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("policyd[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def raise_descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard limit, said in one line;
    returns the limit now in force.

    Each policy client and each milter session holds a descriptor, and the
    usual soft limit (1024, systemd's default too) is less than a busy
    Postfix's smtpd processes (default_process_limit 100 per service, and
    several services).  The hard limit is what the admin allows; a process
    may raise its soft limit to it unprivileged (setrlimit(2)).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard
    if hard == resource.RLIM_INFINITY:
        # The kernel takes no more than fs.nr_open as a descriptor limit.
        try:
            with open("/proc/sys/fs/nr_open") as file:
                wanted = int(file.read())
        except (OSError, ValueError):
            wanted = soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as error:
            log.warning("cannot raise the descriptor limit from %d to %d: %s",
                        soft, wanted, getattr(error, "strerror", None) or error)
        else:
            log.info("descriptors: up to %d open at once (soft limit raised from %d)",
                     wanted, soft)
            return wanted
    log.info("descriptors: up to %d open at once", soft)
    return soft


def log_value(value: str) -> str:
    """A log value on one line: no client byte can forge another log line."""
    value = value[:300]
    if not (value.isascii() and value.isprintable() and " " not in value):
        value = _UNSAFE.sub(_escape, value)   # printable ASCII needs no escape
    return value or '""'


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return "\\x%02x" % code if code < 0x100 else "?"


def decision_line(request: Request, decision: Decision) -> str:
    fields = " ".join(f"{key}={log_value(value)}"
                      for key, value in decision.log_fields(request))
    return f"{log_value(request.queue_id or 'NOQUEUE')}: {fields}"


def log_decision(request: Request, decision: Decision) -> None:
    """One log line per decision, queue id first, then key=value."""
    if log.isEnabledFor(logging.INFO):   # the line is built only to be logged
        log.info("%s", decision_line(request, decision))
    if METRICS is not None:
        METRICS.observe(decision)


# Metrics live in prometheus-client's multiprocess mode: every process that
# decides (policy workers, the milter and its workers) writes its counters to
# files in one directory, and the one process that serves /metrics adds
# them up.  The directory is named by this variable, which children inherit.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    """The counters one deciding process updates."""

    def __init__(self, resolver: EngineResolver) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        # A private registry: these objects write to the multiprocess files;
        # the registry that is served is the collector's (serve_metrics).
        registry = CollectorRegistry()
        self.decisions = Counter("policyd_decisions", "Decisions by rule and action",
                                 ["rule", "action"], registry=registry)
        self.spf = Counter("policyd_spf_results", "SPF results by identity",
                           ["identity", "result"], registry=registry)
        self.iprev = Counter("policyd_iprev_results", "iprev results", ["result"],
                             registry=registry)
        self.dkim = Counter("policyd_dkim_results", "DKIM results", ["result"],
                            registry=registry)
        self.dns_latency = Histogram(
            "policyd_dns_query_seconds", "Latency of DNS queries sent (cache misses)",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5),
            registry=registry)
        self.relay = Counter("policyd_relay_checks", "Relay checks by how the client is "
                             "authorized (none: not a relay client) and result",
                             ["authorized_by", "result"], registry=registry)
        self.limits = Counter("policyd_limit_charges", "Rate-limit charges by where they were "
                              "counted (local-fallback, unavailable: Redis did not answer)",
                              ["backend"], registry=registry)
        self.cache_hits = Counter("policyd_dns_cache_hits", "DNS lookups answered from cache",
                                  registry=registry)
        self.cache_misses = Counter("policyd_dns_cache_misses", "DNS lookups sent",
                                    registry=registry)
        self._follow(resolver)

    def attach(self, resolver: EngineResolver) -> None:
        """Follow this resolver from now on (a reload may bring a new one)."""
        if resolver is not self._resolver:
            self._follow(resolver)

    def _follow(self, resolver: EngineResolver) -> None:
        self._resolver = resolver
        self._seen = resolver.cache_statistics()
        resolver.observers.append(self.dns_latency.observe)

    def observe(self, decision: Decision) -> None:
        self.decisions.labels(decision.rule, decision.action.name).inc()
        for check in decision.spf:
            self.spf.labels(check.identity, check.result.value).inc()
        if decision.iprev is not None:
            self.iprev.labels(decision.iprev.result.value).inc()
        for signature in decision.dkim:
            self.dkim.labels(signature.result.value).inc()
        relay = decision.relay
        if relay is not None:
            self.relay.labels(relay.authorized_by or "none", relay.result).inc()
            if relay.limits_backend:
                self.limits.labels(relay.limits_backend).inc()
        hits, misses = self._resolver.cache_statistics()
        self.cache_hits.inc(hits - self._seen[0])
        self.cache_misses.inc(misses - self._seen[1])
        self._seen = (hits, misses)


METRICS: Metrics | None = None


def prepare_metrics(listen: str, user: str | None = None) -> str | None:
    """In the process that serves /metrics, before it starts any worker:
    the shared directory, or None when metrics are off or a parent
    process (`serve --milter`) already serves them.

    `user`: who the processes will run as once they drop privileges.
    mkdtemp makes the directory mode 0700 for whoever we are now (root,
    to bind a socket in Postfix's private/), so it is given to that user:
    the workers write their files in it, and the process serving /metrics,
    having dropped privileges as well, reads them and removes it at stop.
    """
    import tempfile
    if not listen or os.environ.get(MULTIPROC_ENV):
        return None
    owner = pwd.getpwnam(user) if user else None
    directory = tempfile.mkdtemp(prefix="policyd-metrics-")
    if owner is not None:
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    os.environ[MULTIPROC_ENV] = directory
    return directory


def start_worker_metrics(resolver) -> Metrics | None:
    """In every process that decides."""
    global METRICS
    if not os.environ.get(MULTIPROC_ENV):
        return None
    if METRICS is None:
        METRICS = Metrics(resolver)
    else:
        METRICS.attach(resolver)
    return METRICS


def serve_metrics(listen: str, directory: str):
    """The /metrics endpoint, adding up every process's files, plus the DNS
    cache hit ratio computed from the summed counters."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector as CollectorBase

    class Collector(CollectorBase):
        def __init__(self):
            self.inner = MultiProcessCollector(None, directory)

        def collect(self):
            totals: dict[str, float] = {}
            for family in self.inner.collect():
                for sample in family.samples:
                    if sample.name in ("policyd_dns_cache_hits_total",
                                       "policyd_dns_cache_misses_total"):
                        totals[sample.name] = totals.get(sample.name, 0) + sample.value
                yield family
            hits = totals.get("policyd_dns_cache_hits_total", 0)
            lookups = hits + totals.get("policyd_dns_cache_misses_total", 0)
            ratio = GaugeMetricFamily("policyd_dns_cache_hit_ratio",
                                      "DNS lookups answered from cache / all lookups")
            ratio.add_metric([], hits / lookups if lookups else 0.0)
            yield ratio

    registry = CollectorRegistry()
    registry.register(Collector())
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    log.info("metrics on http://%s/metrics", listen)


def cleanup_metrics(directory: str | None) -> None:
    import shutil
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def drop_privileges(user: str) -> None:
    """Groups, then gid, then uid: the order that leaves nothing behind."""
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
