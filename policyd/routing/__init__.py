"""Outbound routing: IPv4-only delivery per destination, through a Postfix socketmap."""
