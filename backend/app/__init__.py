"""async-processor: a background job processor that needs no broker."""

from __future__ import annotations

__version__ = "0.1.0"
