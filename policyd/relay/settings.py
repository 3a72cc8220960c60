"""The `relay:` and `limits:` config sections (read by policyd/config.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RelayConfig:
    pass


@dataclass(frozen=True)
class LimitsConfig:
    pass
