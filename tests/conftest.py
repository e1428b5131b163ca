"""Test-wide settings: no telemetry, no network, throwaway Prefect home; shared small worlds."""
import dataclasses
import os
import tempfile

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="semid-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # 2 busy cores: be patient

from components.data.world import run_generate  # noqa: E402
from components.params import WorldParams  # noqa: E402
from components.storage import Layout  # noqa: E402


@pytest.fixture(scope="session")
def default_world(tmp_path_factory) -> tuple[Layout, dict]:
    """The default synthetic world (params.yaml defaults) over its first 60 days, generated once per test session."""
    layout = Layout(tmp_path_factory.mktemp("default-world"))
    return layout, run_generate(dataclasses.replace(WorldParams(), days=60), layout)


@pytest.fixture(scope="session")
def small_world_params() -> WorldParams:
    """A world small enough for end-to-end tests of later stages (seconds, not minutes)."""
    return dataclasses.replace(WorldParams(), days=10, active_items=200, impressions_per_day=3000, users=500)
