"""Authorized relaying: who may send out through this server, as whom, and how much."""
