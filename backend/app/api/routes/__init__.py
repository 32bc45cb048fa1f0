"""The API's routers."""

from __future__ import annotations
