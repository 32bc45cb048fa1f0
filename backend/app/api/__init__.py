"""The HTTP API (FastAPI)."""

from __future__ import annotations
