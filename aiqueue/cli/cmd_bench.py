"""Commands: bench (see common.py for the shared options and helpers)."""

from __future__ import annotations

from aiqueue.cli.common import app  # noqa: F401
