"""policyd.milter.macros: libmilter's macro lists searched within bounds,
as smfi_getsymval would search them if it stopped at each list's end."""
from __future__ import annotations

import ctypes

from policyd.milter import macros


def _list(*strings: bytes):
    """A list as libmilter's dec_argv makes it: pointers to NUL-terminated
    strings, then a NULL; what keeps the memory alive is returned too."""
    buffers = [ctypes.create_string_buffer(s) for s in strings]
    array = (ctypes.c_void_p * (len(strings) + 1))(*[ctypes.addressof(b) for b in buffers],
                                                  None)
    return ctypes.addressof(array), (buffers, array)


def _table(*lists):
    table = macros._ARRAY(*(lists + (None,) * (macros.STAGES - len(lists))))
    return table


def test_an_odd_list_is_searched_within_its_bounds():
    connect, keep1 = _list(b"{client_name}", b"mx.example", b"j")       # "j" has no value
    mail, keep2 = _list(b"i", b"Q1", b"{auth_authen}")                  # the last has none
    table = _table(connect, None, mail)
    assert macros._length(mail) == 3
    assert macros.Macros._search(table, "i") == b"Q1"
    assert macros.Macros._search(table, "{i}") == b"Q1"                 # "{x}" also as "x"
    assert macros.Macros._search(table, "{auth_authen}") is None
    assert macros.Macros._search(table, "client_name") is None   # only "x" <-> "{x}"
    assert macros.Macros._search(table, "{client_name}") == b"mx.example"
    assert macros.Macros._search(table, "{j}") is None
    assert macros.Macros._search(table, "{daemon_name}") is None


def test_the_last_stage_is_searched_first():
    connect, keep1 = _list(b"i", b"from connect")
    eom, keep2 = _list(b"i", b"from eom")
    assert macros.Macros._search(_table(connect, None, None, None, None, eom), "i") == b"from eom"


def test_anything_but_libmilters_context_is_left_to_getsymval():
    # pymilter's test context, for one, has no SMFICTX to read.
    class Context:
        pass
    asked = []
    value = macros.Macros().get(Context(), "i", lambda name: asked.append(name) or "Q1")
    assert (value, asked) == ("Q1", ["i"])
