"""The milter front-end: libmilter (through pymilter) over the shared engine."""
