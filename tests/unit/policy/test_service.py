"""policyd.policy.service's own choices that need no running server."""
import asyncio
import logging

import pytest

from policyd.policy import service


def test_the_policy_server_runs_on_uvloop_when_installed(caplog):
    uvloop = pytest.importorskip("uvloop")   # packaging/setup-debian.sh installs it
    before = asyncio.get_event_loop_policy()
    try:
        with caplog.at_level(logging.DEBUG, logger="policyd"):
            service._use_fast_loop()
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)

        async def loop_class():
            return type(asyncio.get_running_loop())

        assert issubclass(asyncio.run(loop_class()), uvloop.Loop)
        assert "event loop: uvloop" in caplog.text
    finally:
        asyncio.set_event_loop_policy(before)


def test_a_worker_unblocks_every_signal_blocked_across_its_fork():
    # The supervisor blocks what it handles and the workers' stop signal
    # across fork(); a worker that left one blocked would never take it.
    from policyd import config as config_module
    supervisor = service.supervisor(None, config_module.parse("", "<test>"))
    assert {*supervisor.handled, supervisor.frontend.stop_signal} <= \
        service.FORK_BLOCKED_SIGNALS
