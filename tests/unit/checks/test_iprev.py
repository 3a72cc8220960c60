"""policyd.checks.iprev: RFC 8601 §3 iprev from the MTA's names or our own lookups."""
from __future__ import annotations

import ipaddress

import dns.reversename
import pytest

from policyd.checks import iprev
from policyd.model import IprevResult
from tests.unit.fakedns import FakeResolver, standard_world

ip = ipaddress.ip_address


# --- what Postfix already knows (client_name / reverse_client_name) ------

@pytest.mark.parametrize("client_name, reverse_client_name, result, ptr_name", [
    ("mail6.other.example", "mail6.other.example", IprevResult.PASS, "mail6.other.example"),
    # PTR present but not forward-confirmed: Postfix says client_name=unknown.
    ("unknown", "liar.other.example", IprevResult.FAIL, "liar.other.example"),
    # RFC 8601 §2.7.3: no PTR published is permerror.
    ("unknown", "unknown", IprevResult.PERMERROR, ""),
    ("", "", IprevResult.PERMERROR, ""),
])
def test_from_mta(client_name, reverse_client_name, result, ptr_name):
    check = iprev.from_mta(client_name, reverse_client_name)
    assert (check.result, check.ptr_name) == (result, ptr_name)
    assert check.dnssec is False   # the MTA cannot tell us


# --- our own lookups ----------------------------------------------------

@pytest.mark.parametrize("address, result, ptr_name", [
    ("2001:db8:6::25", IprevResult.PASS, "mail6.other.example"),
    ("2001:db8:6::26", IprevResult.PERMERROR, ""),
    ("2001:db8:6::27", IprevResult.FAIL, "liar.other.example"),
    ("198.51.100.10", IprevResult.PASS, "helo.other.example"),
    ("198.51.100.11", IprevResult.PERMERROR, ""),
])
def test_lookup_in_standard_world(address, result, ptr_name):
    check = iprev.lookup(standard_world(), ip(address))
    assert (check.result, check.ptr_name) == (result, ptr_name)


def test_forward_lookup_uses_the_address_family():
    resolver = standard_world()
    iprev.lookup(resolver, ip("2001:db8:6::25"))
    assert resolver.asked("mail6.other.example", "AAAA")
    assert not resolver.asked("mail6.other.example", "A")
    resolver = standard_world()
    iprev.lookup(resolver, ip("198.51.100.10"))
    assert resolver.asked("helo.other.example", "A")


def reverse(address: str) -> str:
    return dns.reversename.from_address(address).to_text(omit_final_dot=True)


def test_ptr_lookup_failure_is_temperror():
    resolver = FakeResolver({}, temp_errors=[reverse("192.0.2.1")])
    assert iprev.lookup(resolver, ip("192.0.2.1")).result is IprevResult.TEMPERROR


def test_forward_failure_is_temperror_unless_another_name_passes():
    zone = {reverse("192.0.2.1"): {"PTR": ["broken.example", "good.example"]},
            "good.example": {"A": "192.0.2.1"}}
    passing = iprev.lookup(FakeResolver(zone, temp_errors=["broken.example"]), ip("192.0.2.1"))
    assert (passing.result, passing.ptr_name) == (IprevResult.PASS, "good.example")
    zone["good.example"] = {"A": "192.0.2.2"}
    failing = iprev.lookup(FakeResolver(zone, temp_errors=["broken.example"]), ip("192.0.2.1"))
    assert failing.result is IprevResult.TEMPERROR


def test_forward_nxdomain_is_fail():
    # RFC 8601 §3: the forward lookup returning NXDOMAIN is a fail.
    zone = {reverse("192.0.2.1"): {"PTR": "gone.example"}}
    check = iprev.lookup(FakeResolver(zone), ip("192.0.2.1"))
    assert (check.result, check.ptr_name) == (IprevResult.FAIL, "gone.example")


def test_at_most_ten_ptr_names_are_confirmed():
    names = [f"n{i}.example" for i in range(12)]
    zone = {reverse("192.0.2.1"): {"PTR": names}, "n11.example": {"A": "192.0.2.1"}}
    resolver = FakeResolver(zone)
    check = iprev.lookup(resolver, ip("192.0.2.1"))
    assert check.result is IprevResult.FAIL
    assert not resolver.asked("n10.example") and not resolver.asked("n11.example")
    zone["n9.example"] = {"A": "192.0.2.1"}
    assert iprev.lookup(FakeResolver(zone), ip("192.0.2.1")).ptr_name == "n9.example"


def test_ipv6_address_forms_compare_as_addresses():
    zone = {reverse("2001:db8::1"): {"PTR": "six.example"},
            "six.example": {"AAAA": "2001:0db8:0000::0001"}}
    assert iprev.lookup(FakeResolver(zone), ip("2001:db8::1")).result is IprevResult.PASS


def test_dnssec_needs_both_lookups_secure():
    name = reverse("198.51.100.10")
    both = standard_world(secure=[name, "helo.other.example"])
    assert iprev.lookup(both, ip("198.51.100.10")).dnssec is True
    ptr_only = standard_world(secure=[name])
    assert iprev.lookup(ptr_only, ip("198.51.100.10")).dnssec is False
    untrusted = standard_world(secure=True, trusted=False)
    assert iprev.lookup(untrusted, ip("198.51.100.10")).dnssec is False
