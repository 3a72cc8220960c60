"""DKIM signing of outbound mail, and its keys."""
