"""The MTA's macros of one session, read without libmilter's overrun.

libmilter's smfi_getsymval walks a macro list two entries at a time until
it meets a NULL; a packet with an odd number of strings (a name without a
value: no MTA sends one, a hostile peer can) makes it read past the list
and the worker dies of SIGSEGV (libmilter 8.17).  So such a list is
searched here, within its bounds (`_layout` says how it is found).
"""
from __future__ import annotations

import ctypes
import logging
import threading

log = logging.getLogger("policyd.milter")

STAGES = 7                          # libmilter MAX_MACROS_ENTRIES
_POINTER = ctypes.sizeof(ctypes.c_void_p)
_ARRAY = ctypes.c_void_p * STAGES
# Where SMFICTX is searched for ctx_privdata: struct smfi_str is 264 octets
# on x86-64 (privdata at 256); a little more for other builds.
_SEARCH = 384
# A macro packet is at most 64 KiB, so a list holds fewer strings.
_MAX_STRINGS = 65536

_lock = threading.Lock()
_offset: int | None = None          # of ctx_mac_ptr in SMFICTX, once found
_unusable = False                   # the layout did not check out: getsymval as is


def _pointer(address: int) -> int | None:
    return ctypes.c_void_p.from_address(address).value


def _smfictx(context) -> int | None:
    """pymilter's milter.Context: PyObject_HEAD, then the SMFICTX pointer;
    None for anything else (pymilter's test context, say)."""
    kind = type(context)
    if (kind.__module__, kind.__name__) != ("milter", "Context") or \
            kind.__basicsize__ < object.__basicsize__ + _POINTER:
        return None
    return _pointer(id(context) + object.__basicsize__)


# libmilter keeps each macro packet as the list of its NUL-terminated
# strings (engine.c dec_argv: n strings and a NULL).  The layout of its
# private struct smfi_str is not a public interface, so it is not assumed:
# it is found, and checked, on a live context.  ctx_privdata is the pymilter
# context object itself (pymilter's _get_context calls smfi_setpriv with
# it), and the three macro arrays of MAX_MACROS_ENTRIES pointers, then
# ctx_reply, come right before it; each list's first string starts one
# octet after its packet's buffer (the command octet).  Where that does not
# hold, nothing is read here and getsymval is used as before.
def _layout(smfictx: int, context) -> int | None:
    """ctx_mac_ptr's offset, found by ctx_privdata and checked by the
    buffers; None while no list is there to check it by."""
    global _offset, _unusable
    privdata = None
    for offset in range(0, _SEARCH, _POINTER):
        if _pointer(smfictx + offset) == id(context):
            privdata = offset
            break
    start = (privdata or 0) - _POINTER - 3 * STAGES * _POINTER
    if privdata is None or start < 0:
        _unusable = True
        log.warning("libmilter's context is not laid out as expected; macros are read "
                    "through smfi_getsymval unchecked")
        return None
    lists = _ARRAY.from_address(smfictx + start)
    buffers = _ARRAY.from_address(smfictx + start + STAGES * _POINTER)
    checked = False
    first: int | None
    for strings, buffer in zip(lists, buffers):
        # A packet without a NUL is a list of no strings: its first entry
        # is the NULL, which tells nothing about the layout.
        if (strings is None) != (buffer is None):
            first, expected = -1, None
        else:
            first = None if strings is None else _pointer(strings)
            expected = None if buffer is None else buffer + 1
        if first not in (None, expected):
            _unusable = True
            log.warning("libmilter's macro table is not laid out as expected; macros are "
                        "read through smfi_getsymval unchecked")
            return None
        checked = checked or first is not None
    if checked:
        _offset = start
    return start if checked else None


def _length(strings: int) -> int:
    count = 0
    while count < _MAX_STRINGS and _pointer(strings + count * _POINTER) is not None:
        count += 1
    return count


class Macros:
    """One session's view of libmilter's macro table."""

    def __init__(self):
        self._buffers: tuple = ()       # the packets last checked
        self._odd: tuple[tuple[int, int], ...] = ()   # (list, length) of odd ones

    def get(self, context, name: str, getsymval) -> str | bytes | None:
        """The macro's value as getsymval gives it, or, when a list of odd
        length is in the table, the raw bytes of the value (None if absent)."""
        if _unusable:
            return getsymval(name)
        smfictx = _smfictx(context)
        if smfictx is None:
            return getsymval(name)
        start = _offset
        if start is None:
            with _lock:
                start = _offset if _offset is not None else _layout(smfictx, context)
            if start is None:
                # No macro list yet, or the layout is not ours to read: then
                # getsymval is what libmilter offers (and with no list, safe).
                return getsymval(name)
        buffers = tuple(_ARRAY.from_address(smfictx + start + STAGES * _POINTER))
        if buffers != self._buffers:
            lists = _ARRAY.from_address(smfictx + start)
            self._buffers = buffers
            self._odd = tuple((strings, length) for strings in lists if strings is not None
                              for length in (_length(strings),) if length % 2)
            if self._odd:
                log.warning("the MTA sent a macro without a value; read within bounds "
                            "(libmilter's own lookup would crash)")
        if not self._odd:
            return getsymval(name)
        return self._search(_ARRAY.from_address(smfictx + start), name)

    @staticmethod
    def _search(lists, name: str) -> bytes | None:
        """smfi_getsymval's search (the last stage first; "{x}" also as
        "x", "x" also as "{x}"), bounded by each list's length."""
        wanted = {name.encode("ascii", "replace")}
        if len(name) == 3 and name[0] == "{" and name[2] == "}":
            wanted.add(name[1].encode("ascii", "replace"))
        if len(name) == 1:
            wanted.add(b"{" + name.encode("ascii", "replace") + b"}")
        for strings in reversed(list(lists)):
            if strings is None:
                continue
            length = _length(strings)
            # Ignored for mypy: _pointer may say None (NULL), but not
            # below the list's _length.
            for index in range(0, length, 2):
                if ctypes.string_at(
                        _pointer(strings + index * _POINTER)) in wanted:  # type: ignore[arg-type]
                    if index + 1 >= length:
                        return None
                    return ctypes.string_at(
                        _pointer(strings + (index + 1) * _POINTER))  # type: ignore[arg-type]
        return None
