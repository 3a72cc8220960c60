"""A milter that decides nothing, for the benchmark's ceiling row:

    /usr/bin/python3 bench/milter_null.py unix:/path/to.sock

It takes the callbacks pyspf-milter takes (connect, MAIL, headers, body
end of headers and end of message, all but MAIL and end of message
without a reply), each
returning CONTINUE at once, through the same pymilter and libmilter.  What
the load generator gets from it is the most any pymilter milter can do on
this machine with this load generator beside it: the cost of the client,
of libmilter and of one Python call per protocol step, with no work.
"""
from __future__ import annotations

import sys

import Milter


class NullMilter(Milter.Base):
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def envfrom(self, sender, *parameters):
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self):
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.CONTINUE


def main() -> None:
    Milter.factory = NullMilter
    Milter.runmilter("null", sys.argv[1], 240)


if __name__ == "__main__":
    main()
