"""The decision engine: a Request and a resolver in, a Decision out.

No sockets, no clock of its own, no logging setup, no global state: both
front-ends call the same `Engine.decide`, so the same inputs get the same
verdict whichever front-end asks.  An Engine is immutable after creation
and safe to share between threads; reload builds a new one.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re

from .checks import iprev as iprev_check
from .checks import spf as spf_check
from .config import Config, in_networks, normalize_address, domain_matches
from .dns import CacheMiss, EngineResolver, budget
from .headers import authentication_results, received_spf, safe_value
from .model import (Action, Decision, DkimCheck, DkimResult, IprevCheck, IprevResult,
                    IPAddress, RelayCheck, Reply, Request, SpfCheck, SpfResult, Verdict)
from .relay.authorization import RelayPolicy
from .relay.limits import LocalLimiter, RedisLimiter

_HELO_DOMAIN = re.compile(r"^(?=.{1,253}\.?$)(?:[A-Za-z0-9_-]{1,63}\.)+[A-Za-z0-9-]{1,63}\.?$")

_VERDICT_ACTION = {Verdict.REJECT: Action.REJECT, Verdict.DEFER: Action.DEFER,
                   Verdict.FLAG: Action.ACCEPT, Verdict.NONE: Action.ACCEPT}
# For picking the one check that decides: reject > defer > flag > none.
_VERDICT_RANK = {Verdict.REJECT: 3, Verdict.DEFER: 2, Verdict.FLAG: 1, Verdict.NONE: 0}


@dataclasses.dataclass(frozen=True)
class _Finding:
    rule: str          # "spf.mailfrom.fail", "iprev.permerror", ...
    verdict: Verdict
    reply: Reply | None   # only when the verdict rejects or defers


class Engine:
    def __init__(self, config: Config, resolver: EngineResolver,
                 limiter: LocalLimiter | RedisLimiter | None = None):
        """`limiter`: where rate limits count (runtime/engines.py makes it,
        in Redis or in this process); by default this engine's own."""
        self.config = config
        self.resolver = resolver
        # Relay checks and limits: None when neither is on, so that the
        # default costs one test per decision and nothing else.
        self.relay: RelayPolicy | None = None
        if config.relay.enabled or config.limits.enabled:
            if limiter is None and config.limits.enabled:
                limiter = LocalLimiter(config.limits.local_max_keys)
            self.relay = RelayPolicy(config.relay, config.limits, limiter)
        # Each recipient needs its own decision (relaying, counting), not
        # the first one's (the policy server's and the milter's shortcut).
        self.per_recipient = self.relay is not None
        # A cache of SPF outcomes: transparent (the same answer, sooner),
        # and new with every Engine, so a reload starts it afresh; what it
        # shares with other workers is scoped by what an outcome depends on.
        scope = repr((config.spf, config.dns, config.authserv_id)).encode()
        self.spf_memo = spf_check.SpfMemo(scope=hashlib.sha256(scope).hexdigest()[:16] + "|")

    # -- the envelope: both front-ends, at RCPT ---------------------------

    def decide(self, request: Request, with_headers: bool = True) -> Decision:
        """The envelope verdict.  with_headers=False leaves out the headers
        an accepted message gets: the milter can only add them at end of
        message, from `decide_message`, and building them twice costs."""
        decision = self._envelope(request, with_headers)
        if self.relay is not None:
            decision = self._limit(request, decision)
        return decision

    def _envelope(self, request: Request, with_headers: bool = True) -> Decision:
        """The verdict of every check but the rate limits, which charge
        counters (`_limit`): this part may run again after a cache miss."""
        config = self.config
        address = normalize_address(request.client_address)
        trace: list[str] = [f"client {address} helo={request.helo!r} "
                            f"sender={request.sender or '<>'!r}"]
        relay = None
        if self.relay is not None:
            relay, refused = self.relay.check(request, address)
            trace.append(f"relay: client {relay.authorized_by or 'not a relay client'}, "
                         f"recipient {request.recipient or '<>'!r} "
                         f"{'relayed' if relay.relaying else 'local'}")
            if refused is not None:
                trace.append(f"relay: refused ({refused.rule})")
                return self._conclude(request, address,
                                      [_Finding(refused.rule, Verdict.REJECT, refused.reply)],
                                      (), None, (), trace, with_headers, relay)
            by = relay.authorized_by
            if config.relay.enabled and by and (by == "sasl" or config.relay.skip_checks):
                trace.append(f"relay client ({by}): no SPF or iprev checks")
                return Decision(Action.ACCEPT, rule=f"relay.{by}", relay=relay,
                                trace=tuple(trace))
        if request.sasl_username:
            trace.append("SASL-authenticated client: no SPF or iprev checks")
            return Decision(Action.ACCEPT, rule="sasl", relay=relay, trace=tuple(trace))
        if in_networks(address, config.allowlist):
            trace.append("client in allowlist: no SPF or iprev checks")
            return Decision(Action.ACCEPT, rule="allowlist", relay=relay, trace=tuple(trace))

        # One DNS budget for the whole stage: lookups that time out one
        # after another must not add up to more than dns.timeout, while
        # answers that come, however slowly, cost it nothing.  Answers cost
        # time still: the stage ends within one SPF evaluation's
        # lookup_time_limit (RFC 7208 §4.6.4: at least 20 s) and a
        # dns.timeout, whatever its HELO and iprev lookups add.
        with budget(config.dns.timeout, config.spf.lookup_time_limit + config.dns.timeout):
            spf_results, findings = self._spf(request, address, trace)
            iprev = None
            if not any(self._final(f) for f in findings):
                iprev = self._iprev(request, address, trace)
                if iprev is not None:
                    findings.append(self._iprev_finding(iprev))
            else:
                trace.append("iprev: not checked, the mail is rejected already")
        return self._conclude(request, address, findings, spf_results, iprev, (), trace,
                              with_headers, relay)

    def decide_cached(self, request: Request) -> Decision:
        """`decide` from cached DNS answers alone, for a caller that must
        not wait (an event loop); raises dns.CacheMiss when one is missing,
        and the caller then calls `decide` where it may wait.  Counters in
        Redis are a wait too: a recipient they count is a miss as well."""
        if self.relay is None:
            return self.resolver.cached_only(self.decide, request)
        decision = self.resolver.cached_only(self._envelope, request)
        if self.relay.may_wait and self._counted(request, decision):
            # Only the charge waits: the verdict so far goes with it.
            raise CacheMiss(resume=functools.partial(self._limit, request, decision))
        return self._limit(request, decision)

    # -- rate limits: the one step with an effect ---------------------------

    def _counted(self, request: Request, decision: Decision) -> bool:
        return (self.relay is not None and decision.relay is not None
                and decision.action is Action.ACCEPT and decision.would is None
                and self.relay.counted(request, decision.relay))

    def _limit(self, request: Request, decision: Decision) -> Decision:
        """Charges an accepted recipient to its counters; a limit reached
        defers it (452 4.7.1), in dry run or test mode only says so.  A
        refused recipient charges nothing."""
        if not self._counted(request, decision):
            return decision
        assert self.relay is not None and decision.relay is not None
        address = normalize_address(request.client_address)
        limit, refused, backend = self.relay.charge(request, address, decision.relay)
        relay = dataclasses.replace(decision.relay, limit=limit, limits_backend=backend)
        trace = list(decision.trace)
        trace.append(f"limits ({backend}): " + (
            f"{limit.name} reached for {limit.key}, room in {limit.retry_after:.1f} s"
            if limit else "unavailable" if refused else "within every limit"))
        if refused is None or self.config.test_mode:
            would = Action.DEFER if limit is not None or refused is not None else None
            return dataclasses.replace(decision, relay=relay, would=would, trace=tuple(trace))
        trace.append(f"decision: DEFER rule={refused.rule} "
                     f"reply={refused.reply.code} {refused.reply.status}")
        return Decision(Action.DEFER, refused.reply, rule=refused.rule, reason=refused.rule,
                        spf=decision.spf, iprev=decision.iprev, relay=relay,
                        trace=tuple(trace))

    # -- the message: the milter, at end of message -----------------------

    def decide_message(self, request: Request, envelope: Decision,
                       dkim: tuple[DkimCheck, ...]) -> Decision:
        """Adds DKIM to an envelope decision: the results in the header, and
        for own-domain mail accepted through the relaxed NAT rule, the
        requirement of an aligned DKIM pass (relaxing SPF never means
        trusting unsigned mail)."""
        address = normalize_address(request.client_address)
        trace = list(envelope.trace)
        findings = []
        # A signature must align with the MAIL FROM domain; with the HELO
        # name only when MAIL FROM itself was not relaxed.
        relaxed = sorted((c for c in envelope.spf if c.relaxed_mode),
                         key=lambda c: c.identity != "mailfrom")
        if relaxed and self.config.milter.dkim.nat_requires_aligned_pass:
            domain = relaxed[0].domain
            aligned = [d for d in dkim if d.result is DkimResult.PASS and d.domain
                       and domain_matches(d.domain, self.config.nat.own_domains)
                       and (domain_matches(domain, (d.domain,))
                            or domain_matches(d.domain, (domain,)))]
            if aligned:
                trace.append(f"NAT relaxation: aligned DKIM pass from {aligned[0].domain}")
            else:
                verdict = Verdict(self.config.milter.dkim.nat_requires_aligned_pass)
                trace.append(f"NAT relaxation without an aligned DKIM pass for {domain}: "
                             f"{verdict.value}")
                findings.append(_Finding(
                    "nat.dkim-missing", verdict,
                    Reply("550", "5.7.20", "Own-domain mail from a NAT network "
                          "must carry a valid DKIM signature")
                    if verdict is not Verdict.DEFER else
                    Reply("451", "4.7.20", "Own-domain mail from a NAT network "
                          "must carry a valid DKIM signature, try again later")))
        for check in dkim:
            trace.append(f"dkim {check.result.value} d={check.domain or '-'} {check.reason}")
        envelope_findings = [self._spf_finding(c) for c in envelope.spf]
        if envelope.iprev is not None:
            envelope_findings.append(self._iprev_finding(envelope.iprev))
        decision = self._conclude(request, address, envelope_findings + findings,
                                  envelope.spf, envelope.iprev, dkim, trace)
        if envelope.rule in ("sasl", "allowlist") or envelope.rule.startswith("relay."):
            # Exempt at RCPT: the DKIM results are reported, and the log
            # still says why nothing else was checked.
            decision = dataclasses.replace(decision, rule=envelope.rule)
        if envelope.relay is not None:
            decision = dataclasses.replace(decision, relay=envelope.relay)
        return decision

    # -- the checks --------------------------------------------------------

    def _spf(self, request: Request, address: IPAddress,
             trace: list[str]) -> tuple[tuple[SpfCheck, ...], list[_Finding]]:
        """The SPF checks (HELO first, as headers list them) and their
        findings, in that order."""
        config = self.config
        if not config.spf.enabled:
            return (), []
        helo_is_domain = bool(_HELO_DOMAIN.match(request.helo.strip()))
        # "mx.example." is the domain mx.example; pyspf would take the
        # trailing dot for an empty label and answer "none".
        helo = request.helo.strip().rstrip(".")
        mailfrom = None
        if request.sender:
            mailfrom = spf_check.check_identity(
                self.resolver, config.spf, config.nat, address, "mailfrom",
                request.sender, helo, config.authserv_id, self.spf_memo)
        elif helo_is_domain:
            # RFC 7208 §2.4: the null sender is checked as postmaster@helo;
            # that is the HELO check, so it is not done twice.
            mailfrom = spf_check.check_identity(
                self.resolver, config.spf, config.nat, address, "mailfrom", "", helo,
                config.authserv_id, self.spf_memo)
        mailfrom_finding = None if mailfrom is None else self._spf_finding(mailfrom)
        checks, findings = [], []
        # RFC 7208 §2.3: the HELO identity, checked when it is a domain name.
        # MAIL FROM goes first, and a MAIL FROM result that rejects ends it:
        # nothing the HELO check says can undo a reject, and a forger's
        # HELO name is typically new each time, a DNS miss per message.
        # (§2.3 suggests the opposite order, to spare the MAIL FROM lookups
        # after a conclusive HELO; MAIL FROM is the identity that counts,
        # and its domain's answers are the ones a cache already holds.)
        skipped = None
        if config.spf.helo.check and helo_is_domain and request.sender:
            if self._final(mailfrom_finding):
                skipped = f"spf helo {helo}: not checked, the mail is rejected already"
            else:
                checks.append(spf_check.check_identity(
                    self.resolver, config.spf, config.nat, address, "helo", "", helo,
                    config.authserv_id, self.spf_memo))
                findings.append(self._spf_finding(checks[-1]))
        if mailfrom is not None and mailfrom_finding is not None:   # both or neither
            checks.append(mailfrom)
            findings.append(mailfrom_finding)
        for check in checks:
            line = f"spf {check.identity} {check.domain}: {check.result.value}"
            if check.mechanism:
                line += f" ({check.mechanism})"
            if check.relaxed_mode == "reevaluate":
                line += f"; own domain from NAT network, evaluated as {check.relaxed_via}"
            elif check.relaxed_mode == "pass":
                line += "; own domain from NAT network, passed by nat.mode=pass"
            elif spf_check.nat_applies(config.nat, address, check.domain):
                line += "; own domain from NAT network, but no public address passes"
            line += "; dnssec" if check.dnssec else "; no dnssec"
            trace.append(line)
        if skipped:
            trace.append(skipped)
        return tuple(checks), findings

    def _final(self, finding: _Finding | None) -> bool:
        """A finding no other can change: a reject, unless in test mode
        (which accepts everything, with every result in its headers)."""
        return (finding is not None and finding.verdict is Verdict.REJECT
                and not self.config.test_mode)

    def _iprev(self, request: Request, address: IPAddress, trace: list[str]) -> IprevCheck | None:
        config = self.config.iprev
        if not (config.ipv6 if address.version == 6 else config.ipv4):
            return None
        if in_networks(address, self.config.nat.networks):
            trace.append("iprev: client in NAT networks, exempt")
            return None
        if request.client_name is not None and request.reverse_client_name is not None:
            check = iprev_check.from_mta(request.client_name, request.reverse_client_name)
            source = "from the MTA"
        else:
            check = iprev_check.lookup(self.resolver, address)
            source = "own lookup"
        trace.append(f"iprev {address}: {check.result.value} ({source}"
                     f"{', ' + check.ptr_name if check.ptr_name else ''}"
                     f"{', ' + check.reason if check.reason else ''})")
        return check

    def _spf_finding(self, check: SpfCheck) -> _Finding:
        actions = self.config.spf.mailfrom if check.identity == "mailfrom" \
            else self.config.spf.helo
        if check.malformed:
            # No domain to judge: Postfix would qualify a bare local part
            # with $myorigin, typically an own domain (see parse_mail_from).
            verdict = self.config.spf.mailfrom.on_malformed
            if verdict is Verdict.NONE or verdict is Verdict.FLAG:
                return _Finding("spf.mailfrom.malformed", verdict, None)
            # RFC 3463 §3.2: X.1.7 bad sender's mailbox address syntax;
            # RFC 5321 §4.2.2: 553 mailbox name not allowed.
            return _Finding("spf.mailfrom.malformed", verdict,
                            Reply("553", "5.1.7", "Malformed sender address")
                            if verdict is Verdict.REJECT else
                            Reply("451", "4.1.7", "Malformed sender address, try again later"))
        verdict = getattr(actions, "on_" + check.result.value)
        rule = f"spf.{check.identity}.{check.result.value}"
        if verdict is Verdict.NONE or verdict is Verdict.FLAG:
            return _Finding(rule, verdict, None)   # accepted: no reply to word
        domain = safe_value(check.domain)
        # RFC 7372 §3: 5.7.23 SPF validation failed, 5.7.24 SPF validation error.
        if check.result in (SpfResult.FAIL, SpfResult.SOFTFAIL):
            text = f"SPF {check.result.value}: {domain} does not designate this host " \
                   f"as a permitted sender ({check.identity})"
            reply = Reply("550", "5.7.23", text) if verdict is Verdict.REJECT \
                else Reply("451", "4.7.23", text)
        elif check.result is SpfResult.PERMERROR:
            reply = Reply("550", "5.7.24", f"SPF permanent error for {domain} "
                          f"({check.identity})") if verdict is Verdict.REJECT else \
                Reply("451", "4.7.24", f"SPF permanent error for {domain} ({check.identity})")
        elif check.result is SpfResult.TEMPERROR:
            text = f"SPF temporary error for {domain} ({check.identity}), try again later"
            reply = Reply("451", "4.7.24", text) if verdict is not Verdict.REJECT \
                else Reply("550", "5.7.24", f"SPF error for {domain} ({check.identity})")
        else:
            text = f"SPF {check.result.value} for {domain} ({check.identity}) is not accepted"
            reply = Reply("550", "5.7.1", text) if verdict is Verdict.REJECT \
                else Reply("450", "4.7.1", text)
        return _Finding(rule, verdict, reply)

    def _iprev_finding(self, check: IprevCheck) -> _Finding:
        config = self.config.iprev
        if check.result is IprevResult.PASS:
            verdict = Verdict.NONE
        elif check.result is IprevResult.TEMPERROR:
            verdict = config.on_temperror
        else:
            verdict = config.on_fail
        if verdict is Verdict.NONE or verdict is Verdict.FLAG:
            return _Finding(f"iprev.{check.result.value}", verdict, None)
        text = safe_value(config.reject_text)
        # RFC 7372 §3: 5.7.25 reverse DNS validation failed.
        if verdict is Verdict.REJECT:
            reply = Reply("550", "5.7.25", text)
        else:
            reply = Reply("450", "4.7.25", text)
        return _Finding(f"iprev.{check.result.value}", verdict, reply)

    # -- the verdict ---------------------------------------------------------

    def _conclude(self, request: Request, address: IPAddress, findings: list[_Finding],
                  spf: tuple[SpfCheck, ...], iprev: IprevCheck | None,
                  dkim: tuple[DkimCheck, ...], trace: list[str],
                  with_headers: bool = True, relay: RelayCheck | None = None) -> Decision:
        config = self.config
        worst = max(findings, key=lambda f: _VERDICT_RANK[f.verdict], default=None)
        if worst is None or worst.verdict is Verdict.NONE:
            relaxed = next((c for c in spf if c.relaxed_mode), None)
            rule = "nat.relaxed" if relaxed else "pass" if any(
                c.result is SpfResult.PASS for c in spf) else "none"
        else:
            rule = worst.rule
        action = _VERDICT_ACTION[worst.verdict] if worst else Action.ACCEPT
        reply = worst.reply if worst and action is not Action.ACCEPT else None
        would = None
        if config.test_mode and action is not Action.ACCEPT:
            assert reply is not None   # a finding that rejects or defers has one
            trace.append(f"test mode: would {action.name} with {reply.code} {reply.status}")
            would, action, reply = action, Action.ACCEPT, None
        headers = []
        if action is Action.ACCEPT and with_headers:
            if config.headers.authentication_results:
                header = authentication_results(config.authserv_id, address, spf, iprev, dkim)
                if header is not None:
                    headers.append(header)
            if config.headers.received_spf:
                mailfrom = next((c for c in spf if c.identity == "mailfrom"), None)
                if mailfrom is not None:
                    headers.append(received_spf(mailfrom, address, request.helo,
                                                request.sender, config.authserv_id))
        trace.append(f"decision: {action.name} rule={rule}"
                     + (f" reply={reply.code} {reply.status}" if reply else ""))
        return Decision(action=action, reply=reply, rule=rule, headers=tuple(headers),
                        reason=worst.rule if worst else "", would=would, spf=spf,
                        iprev=iprev, dkim=dkim, relay=relay, trace=tuple(trace))
