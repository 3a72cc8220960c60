"""The `routing:` config section (read by policyd/config.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoutingConfig:
    pass
