"""A handler module that exists but fails while importing (what it imports is missing): a
daemon with it in HANDLER_MODULES exits 1, an error, not 2 (the setting is right)."""

from __future__ import annotations

import no_such_dependency_of_the_handlers  # type: ignore[import-not-found]  # noqa: F401
