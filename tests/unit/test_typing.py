"""mypy over policyd/ (setup.cfg's [mypy]), so `python3 -m pytest` alone
shows a typing regression; and the test resolver against the checks'
contract (policyd.dns.Lookups)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MYPY = shutil.which("mypy")

pytestmark = pytest.mark.skipif(MYPY is None, reason="mypy is not installed (Debian: mypy)")


def _mypy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([MYPY, "--no-incremental", "--cache-dir=/dev/null", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_policyd_is_clean_under_mypy():
    result = _mypy()
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_fake_resolver_keeps_the_checks_contract(tmp_path):
    # The fake's body is not checked, only that it is a Lookups.
    probe = tmp_path / "probe.py"
    probe.write_text("from policyd.dns import Lookups\n"
                     "from tests.unit.fakedns import FakeResolver\n"
                     "lookups: Lookups = FakeResolver({})\n")
    result = _mypy("--config-file", str(ROOT / "setup.cfg"), "--follow-imports=silent",
                   str(probe))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_contract_is_reported(tmp_path):
    # The check above can fail: a resolver without `ptr` is no Lookups.
    probe = tmp_path / "probe.py"
    probe.write_text("from policyd.dns import Lookup, Lookups\n"
                     "class Half:\n"
                     "    def query(self, name: str, rdtype: str,\n"
                     "              lifetime: float | None = None) -> Lookup: ...\n"
                     "lookups: Lookups = Half()\n")
    result = _mypy("--config-file", str(ROOT / "setup.cfg"), "--follow-imports=silent",
                   str(probe))
    assert result.returncode == 1 and "ptr" in result.stdout, result.stdout
