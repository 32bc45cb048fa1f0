"""Where handler modules are looked for (app.services.handlers.import_handler_modules)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.services import handlers


@pytest.fixture
def clean_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """sys.path as the `async-processor` script has it (no working directory on it), and
    the working directory a fresh folder."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_working_directory_is_searched_for_a_module_found_nowhere_else(
    clean_path: Path,
) -> None:
    (clean_path / "only_here.py").write_text("")
    handlers._import_from_the_working_directory(["only_here"])
    assert sys.path[-1] == str(clean_path)


def test_not_when_every_module_is_installed(clean_path: Path) -> None:
    """An installed module needs no search of the working directory; added anyway, a later
    import of a name installed nowhere (uvicorn looks for websockets) ran whatever file of
    that name was there (from a review)."""
    (clean_path / "websockets.py").write_text("raise SystemExit('ran from the cwd')\n")
    handlers._import_from_the_working_directory(["app.services.analysis"])
    assert str(clean_path) not in sys.path
    handlers._import_from_the_working_directory(["no_such_module_anywhere"])
    assert str(clean_path) not in sys.path  # not there either: nothing to find
