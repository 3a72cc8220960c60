"""policyd.runtime.sockets: the listen-spec grammars of each front-end, and
the sockets bound for them (UNIX socket mode, group and stale files, TCP
options, worker slots).  The servers on these sockets are tested in
tests/unit/policy/test_server.py and tests/unit/milter/test_server.py."""
from __future__ import annotations

import grp
import os
import socket
import stat

import pytest

from policyd import config as config_module
from policyd.runtime import sockets
from policyd.runtime.sockets import (ListenError, UnixSocket, bind_milter, bind_milter_slots,
                                     bind_postfix, parse_milter, parse_postfix)


# --- Postfix: inet:HOST:PORT, unix:PATH (the policy service) -------------------------

@pytest.mark.parametrize("spec, expected", [
    ("inet:127.0.0.1:10023", ("inet", "127.0.0.1", 10023)),
    ("inet:[::1]:10023", ("inet", "::1", 10023)),
    ("inet:localhost:0", ("inet", "localhost", 0)),
    ("unix:/var/spool/postfix/private/policyd", ("unix", "/var/spool/postfix/private/policyd",
                                                 None)),
    ("unix:relative/policyd", ("unix", "relative/policyd", None)),
])
def test_parse_postfix(spec, expected):
    assert parse_postfix(spec) == expected


def test_an_ipv6_address_without_brackets_is_refused():
    # As config.py's pattern (inet:HOST:PORT with HOST free of colons, or
    # inet:[IPV6]:PORT), so that it can validate with this parser.
    with pytest.raises(ListenError, match="inet:HOST:PORT"):
        parse_postfix("inet:::1:10023")


@pytest.mark.parametrize("spec", ["inet:127.0.0.1", "inet::25", "inet:[::1]", "unix:",
                                  "tcp:127.0.0.1:25", "inet:127.0.0.1:65536"])
def test_bad_postfix_specs_are_refused(spec):
    with pytest.raises(ListenError):
        parse_postfix(spec)


def _postfix_unix(**settings) -> UnixSocket:
    return UnixSocket(**{"mode": 0o660, "section": "policy", "make_directory": True,
                         **settings})


def test_a_postfix_host_name_is_bound_on_each_address_ipv6_only():
    # As Postfix's inet_listen: every address of the name; the IPv6 socket
    # IPv6 only, so that the IPv4 one can take the same port.
    found = {info[0] for info in socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)}
    listener = bind_postfix("inet:localhost:0", _postfix_unix())
    try:
        assert {sock.family for sock in listener.sockets} == found
        for sock in listener.sockets:
            assert not sock.getblocking()
            if sock.family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        assert all(address.startswith("inet:") for address in listener.addresses)
    finally:
        listener.close()


def test_a_postfix_unix_socket_gets_its_directory_mode_and_group(tmp_path):
    group = grp.getgrnam("mail")
    path = tmp_path / "spool" / "private" / "policyd"
    listener = bind_postfix(f"unix:{path}", _postfix_unix(mode=0o620, group=group.gr_name))
    try:
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == 0o620
        assert info.st_gid == group.gr_gid
        assert listener.addresses == [f"unix:{path}"]
    finally:
        listener.close()
    assert not path.exists()


def test_the_group_error_names_the_front_ends_setting(tmp_path):
    with pytest.raises(ListenError, match="^routing.socket_group: no group 'no-such-group'$"):
        bind_postfix(f"unix:{tmp_path}/socketmap",
                     _postfix_unix(group="no-such-group", section="routing"))
    assert not (tmp_path / "socketmap").exists()


def test_a_host_name_that_cannot_be_encoded_is_a_listen_error():
    # IDNA refuses a label over 63 octets (RFC 1035 §2.3.4): a line of
    # error, not a traceback at start.
    spec = f"inet:{'é' * 64}.example:10023"
    with pytest.raises(ListenError, match=f"^{spec}: "):
        bind_postfix(spec, _postfix_unix())


# --- libmilter: inet:PORT@HOST, inet6:PORT@HOST, unix:PATH (the milter) ---------------

@pytest.mark.parametrize("spec, parsed", [
    ("inet:10025@127.0.0.1", ("inet", "127.0.0.1", 10025)),
    ("inet:10025", ("inet", "", 10025)),
    ("inet6:10025@::1", ("inet6", "::1", 10025)),
    ("inet6:10025@[::1]", ("inet6", "::1", 10025)),
    ("unix:/run/policyd/milter.sock", ("unix", "/run/policyd/milter.sock", None)),
    ("local:/run/policyd/milter.sock", ("unix", "/run/policyd/milter.sock", None)),
])
def test_libmilter_socket_specs(spec, parsed):
    assert parse_milter(spec) == parsed


@pytest.mark.parametrize("spec", ["inet:127.0.0.1:10025", "inet:0@127.0.0.1", "inet:x@h",
                                  "inet:70000@h", "unix:", "tcp:1@h", ""])
def test_bad_specs_say_what_is_expected(spec):
    with pytest.raises(ListenError, match="inet:PORT@HOST"):
        parse_milter(spec)


def test_unix_socket_is_created_0660_without_a_window(tmp_path):
    path = tmp_path / "milter.sock"
    listener = bind_milter(f"unix:{path}")
    try:
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == sockets.UNIX_SOCKET_MODE
    finally:
        listener.socket.close()
        os.unlink(path)


def test_unix_socket_takes_the_configured_mode_and_group(tmp_path):
    # Postfix connects as the postfix user: through the socket's group.
    group = grp.getgrnam("mail")
    path = tmp_path / "milter.sock"
    config = config_module.parse(f"milter:\n  listen: unix:{path}\n  socket_mode: 0620\n"
                                 f"  socket_group: {group.gr_name}\n", "x.yaml")
    [listener] = bind_milter_slots(config.milter.listen, 1, mode=int(config.milter.socket_mode, 8),
                                group=config.milter.socket_group)
    try:
        info = os.lstat(path)
        assert stat.S_IMODE(info.st_mode) == 0o620
        assert info.st_gid == group.gr_gid
    finally:
        listener.socket.close()
        os.unlink(path)


def test_an_unknown_socket_group_is_a_listen_error_and_leaves_no_socket(tmp_path):
    path = tmp_path / "milter.sock"
    with pytest.raises(ListenError, match="milter.socket_group: no group 'no-such-group'"):
        bind_milter(f"unix:{path}", group="no-such-group")
    assert not path.exists()


def test_stale_unix_socket_is_replaced_a_live_one_or_a_file_is_not(tmp_path):
    path = tmp_path / "milter.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                     # bound, nobody listening: stale
    listener = bind_milter(f"unix:{path}")
    try:
        with pytest.raises(ListenError, match="another milter is listening"):
            bind_milter(f"unix:{path}")
    finally:
        listener.socket.close()
    os.unlink(path)
    path.write_text("not a socket")
    with pytest.raises(ListenError, match="not a socket"):
        bind_milter(f"unix:{path}")
    assert path.read_text() == "not a socket"


def test_tcp_listener_has_nodelay_for_its_connections():
    listener = bind_milter("inet:0@127.0.0.1".replace(":0@", f":{_free_port()}@"))
    try:
        sock = listener.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        host, port = listener.wake_address
        with socket.create_connection((host, port)):
            accepted, _ = sock.accept()
            with accepted:
                # Linux copies the listener's options to accepted sockets.
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.socket.close()


def test_wildcard_listener_is_woken_through_loopback():
    listener = bind_milter(f"inet6:{_free_port()}")
    try:
        assert listener.wake_address[0] == "::1"
    finally:
        listener.socket.close()


def test_tcp_worker_slots_get_a_socket_each_on_one_port():
    spec = f"inet:{_free_port()}@127.0.0.1"
    listeners = bind_milter_slots(spec, 3)
    try:
        sockets = [listener.socket for listener in listeners]
        assert len(set(map(id, sockets))) == 3
        assert len({sock.getsockname() for sock in sockets}) == 1
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for listener in listeners:
            listener.socket.close()


def test_a_port_in_use_is_refused_though_our_sockets_share_theirs():
    # Without the first bind (no SO_REUSEPORT) a second milter of the same
    # user would join the first one's group and take half its connections.
    spec = f"inet:{_free_port()}@127.0.0.1"
    listeners = bind_milter_slots(spec, 2)
    try:
        with pytest.raises(ListenError, match=rf"^{spec}: Address already in use"):
            bind_milter_slots(spec, 2)
    finally:
        for listener in listeners:
            listener.socket.close()
    for listener in bind_milter_slots(spec, 2):    # free again
        listener.socket.close()


def test_unix_worker_slots_share_one_socket(tmp_path):
    listeners = bind_milter_slots(f"unix:{tmp_path / 'milter.sock'}", 3)
    try:
        assert len({id(listener.socket) for listener in listeners}) == 1
    finally:
        listeners[0].socket.close()


def test_listen_error_names_the_spec():
    with pytest.raises(ListenError, match=r"^inet:1@192\.0\.2\.1: "):
        bind_milter("inet:1@192.0.2.1")   # not an address of this host


def test_socket_file_is_removed_only_while_it_is_ours(tmp_path):
    path = tmp_path / "milter.sock"
    old = bind_milter(f"unix:{path}")
    os.unlink(path)                         # removed by hand while we run
    newer = bind_milter(f"unix:{path}")   # another milter's, in its place
    try:
        old.remove_socket_file()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        newer.remove_socket_file()
        assert not path.exists()
    finally:
        old.socket.close()
        newer.socket.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bind_all_closes_what_it_bound_when_one_fails(tmp_path):
    opened = []

    def bind(spec):
        if spec == "bad":
            raise sockets.ListenError("cannot listen on bad")
        listener = sockets.bind_postfix(spec, sockets.UnixSocket(0o600, "", section="policy"))
        opened.append(listener)
        return listener

    path = tmp_path / "a.sock"
    with pytest.raises(sockets.ListenError):
        sockets.bind_all([f"unix:{path}", "bad"], bind)
    assert len(opened) == 1 and not path.exists()
    assert all(sock.fileno() == -1 for sock in opened[0].sockets)
