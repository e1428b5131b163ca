"""Test-wide settings: no telemetry, no network, throwaway Prefect home; shared small worlds; the S3 endpoint."""
import dataclasses
import os
import tempfile
import uuid

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


@pytest.fixture(scope="session")
def s3_endpoint():
    """The S3 endpoint the S3 tests run against: S3_TEST_ENDPOINT when set (the moto_server `make test` starts,
    MinIO or AWS, with the AWS_* credentials of the environment), else a moto server started here. Dummy
    credentials are set only where none are."""
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("AWS_ACCESS_KEY_ID"):
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_DEFAULT_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        if os.environ.get("S3_TEST_ENDPOINT"):
            yield os.environ["S3_TEST_ENDPOINT"].rstrip("/")
            return
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


def new_bucket(endpoint: str, label: str) -> str:
    """A new, empty bucket named for `label`, unique across runs (a MinIO or AWS endpoint outlives the tests)."""
    import boto3

    name = f"{label.lower().replace('_', '-')[:40].strip('-')}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name
