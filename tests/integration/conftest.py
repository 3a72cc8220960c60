"""Fixtures shared by the integration tests: the real DNS world."""
from __future__ import annotations

import pytest

from tests.integration.dnsworld import UnboundServer, start_unbound, write_config


@pytest.fixture(scope="session")
def unbound(tmp_path_factory) -> UnboundServer:
    """unbound on 127.0.0.201 and a free port, serving the standard world."""
    server = start_unbound(tmp_path_factory.mktemp("unbound"))
    yield server
    server.stop()


@pytest.fixture
def policyd_config(tmp_path, unbound):
    """Path of a policyd config for the standard world, resolving through unbound."""
    return write_config(tmp_path, unbound)
