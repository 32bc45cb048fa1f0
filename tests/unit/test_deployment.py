"""The shipped unit files and env example agree with the daemon's behaviour and settings."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from app.config import DEFAULT_SHUTDOWN_GRACE_SECONDS, ENV_PREFIX, Settings

DEPLOYMENT = Path(__file__).resolve().parents[2] / "deployment"


def unit(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOYMENT / name)
    return parser["Service"]


def test_daemon_unit_is_notify_restarting_and_outlives_the_grace() -> None:
    service = unit("async-processor.service")
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"] == "2"  # a bad setting: no restart loop
    assert service["SyslogIdentifier"] == "async-processor"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= DEFAULT_SHUTDOWN_GRACE_SECONDS + 15
    assert service["ExecStart"].endswith("python -m app.background_processor")
    assert service["EnvironmentFile"] == "/etc/async-processor/async-processor.env"
    assert service["User"] == "async-processor"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["ReadWritePaths"] == "/var/lib/async-processor"


def test_api_unit_runs_the_api_command() -> None:
    service = unit("async-processor-api.service")
    assert "async-processor api" in service["ExecStart"]
    assert service["Restart"] == "always"
    assert service["RestartPreventExitStatus"] == "2"
    assert service["SyslogIdentifier"] == "async-processor-api"


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_env_example_documents_every_setting(field: str) -> None:
    text = (DEPLOYMENT / "async-processor.env.example").read_text()
    assert f"\n{ENV_PREFIX}{field.upper()}=" in text
