"""The daemon's parts: one class per background concern."""

from __future__ import annotations
