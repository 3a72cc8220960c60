"""relay/senders.py: Postfix sender_login_maps read as Postfix reads them."""
from __future__ import annotations

import pytest

from policyd.relay.senders import (FixedTable, MapError, SenderOwners, config_table,
                                   load_map)
from policyd.relay.settings import SenderLogin

HASH = """\
# owner of each address
alice@own.example      alice
bob@own.example        bob,
    carol
@shared.example        alice bob
POSTMASTER@Own.Example admin
alice@own.example      mallory
"""

REGEXP = """\
# regexp_table(5)
/^(.*)@users\\.example$/      $1
if /@team\\.example$/
/^dev-/                       devs
!/^ops-/                      nobody
endif
/^Exact@case\\.example$/i     sensitive
"""


@pytest.fixture
def owners(tmp_path):
    (tmp_path / "logins").write_text(HASH)
    (tmp_path / "logins.re").write_text(REGEXP)
    tables = (load_map(f"hash:{tmp_path}/logins"), load_map(f"regexp:{tmp_path}/logins.re"))
    return SenderOwners(tables, "+", ("own.example",))


@pytest.mark.parametrize("sender, expected", [
    ("alice@own.example", ("alice",)),
    ("ALICE@OWN.EXAMPLE", ("alice",)),                 # hash keys are folded
    ("alice@own.example.", ("alice",)),                # Postfix drops one trailing dot
    ("alice+lists@own.example", ("alice",)),           # recipient_delimiter
    ("bob@own.example", ("bob", "carol")),             # continuation line, commas
    ("postmaster@own.example", ("admin",)),
    ("anyone@shared.example", ("alice", "bob")),       # @domain
    ("x@sub.shared.example", None),                    # @domain is that domain only
    ("someone@users.example", ("someone",)),           # regexp with $1
    ("dev-1@team.example", ("devs",)),                 # inside if/endif
    ("qa@team.example", ("nobody",)),                  # negated pattern
    ("ops-1@team.example", None),
    ("dev-1@other.example", None),                     # the if did not match
    ("Exact@CASE.example", ("sensitive",)),            # the domain is read in lower case
    ("exact@case.example", None),                      # the i flag made it case-sensitive
    ("nobody@nowhere.example", None),
    ("alice", None),                                   # no domain: never owned
])
def test_lookup_order_and_forms(owners, sender, expected):
    assert owners.owners(sender) == expected


def test_partial_keys_are_not_asked_of_regexp_tables(tmp_path):
    (tmp_path / "re").write_text("/^@own\\.example$/ alice\n/^alice@own\\.example$/ alice\n")
    owners = SenderOwners((load_map(f"regexp:{tmp_path}/re"),), "+", ())
    assert owners.owners("x@own.example") is None        # "@own.example" is a partial key
    assert owners.owners("alice+x@own.example") is None  # so is the address less its extension
    assert owners.owners("alice@own.example") == ("alice",)


def test_owned_by():
    owners = SenderOwners((config_table((SenderLogin("Alice", ("alice@own.example",)),)),),
                          "+", ())
    assert owners.owned_by("alice@own.example", "alice") is True
    assert owners.owned_by("alice@own.example", "bob") is False
    assert owners.owned_by("x@own.example", "bob") is None
    assert owners.owned_by("x", "bob") is False


def test_local_part_alone_for_local_domains_only(tmp_path):
    table = FixedTable("t", {"alice": "alice"})
    owners = SenderOwners((table,), "+", ("own.example",))
    assert owners.owners("alice+x@own.example") == ("alice",)
    assert owners.owners("alice@other.example") is None


@pytest.mark.parametrize("text, message", [
    ("lonely-key\n", "line 1: expected 'key value'"),
])
def test_bad_hash_file(tmp_path, text, message):
    (tmp_path / "m").write_text(text)
    with pytest.raises(MapError, match=message):
        load_map(f"hash:{tmp_path}/m")


@pytest.mark.parametrize("text, message", [
    ("/a(/ x\n", "line 1: bad regular expression"),
    ("/a/\n", "line 1: a pattern without a result"),
    ("if /a/\n/b/ x\n", "if without endif"),
    ("endif\n", "line 1: endif without if"),
    ("plain text\n", "line 1: expected /pattern/ result"),
])
def test_bad_regexp_file(tmp_path, text, message):
    (tmp_path / "m").write_text(text)
    with pytest.raises(MapError, match=message):
        load_map(f"regexp:{tmp_path}/m")


@pytest.mark.parametrize("source, message", [
    ("btree:/etc/x", "type 'btree' is not one of"),
    ("hash:relative", "is not TYPE:/absolute/path"),
    ("hash:/nonexistent/sender_login", "cannot read"),
])
def test_bad_sources(source, message):
    with pytest.raises(MapError, match=message):
        load_map(source)
