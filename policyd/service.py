"""What both daemons share: logging, the decision log line, metrics,
privilege drop."""
from __future__ import annotations

import logging
import os
import re
import sys

from .model import Decision, Request

log = logging.getLogger("policyd")

_UNSAFE = re.compile(r"[^\x21-\x7e]")


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("policyd[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_value(value: str) -> str:
    """A log value on one line: no client byte can forge another log line."""
    value = _UNSAFE.sub(lambda m: "\\x%02x" % (ord(m.group()) & 0xff)
                        if ord(m.group()) < 0x100 else "?", value[:300])
    return value or '""'


def decision_line(request: Request, decision: Decision) -> str:
    fields = " ".join(f"{key}={log_value(value)}"
                      for key, value in decision.log_fields(request))
    return f"{log_value(request.queue_id or 'NOQUEUE')}: {fields}"


def log_decision(request: Request, decision: Decision) -> None:
    """One log line per decision, queue id first, then key=value."""
    log.info("%s", decision_line(request, decision))
    if METRICS is not None:
        METRICS.observe(decision)


class Metrics:
    """Prometheus metrics in a registry of their own (no library globals)."""

    def __init__(self, resolver):
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.core import GaugeMetricFamily
        self.registry = CollectorRegistry()
        self.decisions = Counter("policyd_decisions", "Decisions by rule and action",
                                 ["rule", "action"], registry=self.registry)
        self.spf = Counter("policyd_spf_results", "SPF results by identity",
                           ["identity", "result"], registry=self.registry)
        self.iprev = Counter("policyd_iprev_results", "iprev results", ["result"],
                             registry=self.registry)
        self.dkim = Counter("policyd_dkim_results", "DKIM results", ["result"],
                            registry=self.registry)
        self.dns_latency = Histogram(
            "policyd_dns_query_seconds", "DNS query latency (cache hits included)",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2, 5),
            registry=self.registry)
        resolver.observers.append(self.dns_latency.observe)

        class CacheCollector:
            def collect(self_inner):
                hits, misses = resolver.cache_statistics()
                total = hits + misses
                family = GaugeMetricFamily("policyd_dns_cache_hit_ratio",
                                           "DNS cache hits / lookups")
                family.add_metric([], hits / total if total else 0.0)
                yield family
        self.registry.register(CacheCollector())

    def observe(self, decision: Decision) -> None:
        self.decisions.labels(decision.rule, decision.action.name).inc()
        for check in decision.spf:
            self.spf.labels(check.identity, check.result.value).inc()
        if decision.iprev is not None:
            self.iprev.labels(decision.iprev.result.value).inc()
        for check in decision.dkim:
            self.dkim.labels(check.result.value).inc()

    def serve(self, listen: str):
        from prometheus_client import start_http_server
        host, _, port = listen.rpartition(":")
        return start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)


METRICS: Metrics | None = None


def start_metrics(listen: str, resolver) -> Metrics | None:
    """Starts the endpoint once per process; later calls (reload) keep it."""
    global METRICS
    if not listen or METRICS is not None:
        return METRICS
    METRICS = Metrics(resolver)
    METRICS.serve(listen)
    log.info("metrics on http://%s/metrics", listen)
    return METRICS


def drop_privileges(user: str) -> None:
    """Groups, then gid, then uid: the order that leaves nothing behind."""
    import pwd
    entry = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
