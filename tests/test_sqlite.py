"""The SQLite boundary (ledger/sqlite.py): group commit, one caller's error kept to itself, cancellation that never
leaves a caller wrong about whether its rows were written, and a failing disk reported to every caller."""

from __future__ import annotations


import pytest
import trio

from llorch.ledger.errors import StoreError
from llorch.ledger.sqlite import IntegrityError, open_database

INSERT = "INSERT INTO t (id, v) VALUES (?, ?)"


async def count_rows(database) -> int:
    return (await database.fetchone("SELECT COUNT(*) FROM t"))[0]


def count_commits(database) -> list[str]:
    """Every COMMIT the connection runs, from SQLite's own trace of executed statements."""
    commits: list[str] = []
    database._connection.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    return commits


async def test_concurrent_transactions_share_commits_and_all_are_written(tmp_path):
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        commits = count_commits(database)
        async with trio.open_nursery() as nursery:
            for n in range(40):
                nursery.start_soon(database.transaction, [(INSERT, [(n, "a")]), (INSERT, [(n + 1000, "b")])])
        assert await count_rows(database) == 80
        assert 1 <= len(commits) < 40, f"{len(commits)} commits for 40 concurrent transactions"


async def test_one_callers_constraint_error_rolls_back_only_its_own_rows(tmp_path):
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        await database.transaction([(INSERT, [(7, "taken")])])
        outcomes: dict[int, str] = {}

        async def write(n: int) -> None:
            rows = [(n, "first"), (7, "clash")] if n == 5 else [(n, "ok")]
            try:
                await database.transaction([(INSERT, rows)])
                outcomes[n] = "written"
            except IntegrityError:
                outcomes[n] = "refused"

        async with trio.open_nursery() as nursery:
            for n in range(10, 30):
                nursery.start_soon(write, n)
            nursery.start_soon(write, 5)
        assert outcomes.pop(5) == "refused"
        assert set(outcomes.values()) == {"written"}
        assert await database.fetchone("SELECT v FROM t WHERE id = 5") is None      # its first row rolled back too
        assert await count_rows(database) == 1 + 20


async def hold_the_lock(database, release: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Stand for a commit (or read) under way: hold the connection until ``release``."""
    async with database._lock:
        task_status.started()
        await release.wait()


async def test_a_transaction_cancelled_before_its_commit_never_happens(tmp_path):
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_lock, database, release)
            with trio.move_on_after(0.05) as scope:
                await database.transaction([(INSERT, [(1, "never")])])
            assert scope.cancelled_caught
            release.set()
        await database.transaction([(INSERT, [(2, "later")])])
        assert await database.fetchall("SELECT id FROM t") == [(2,)]


async def test_a_transaction_cancelled_while_its_commit_runs_is_written_and_says_so(tmp_path):
    """Cancelled after another caller's group commit took it, the transaction finishes: the caller returns
    normally and its row is there (never "cancelled" with the row written)."""
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        release, returned = trio.Event(), []
        rider_scope = trio.CancelScope()

        async def rider() -> None:
            with rider_scope:
                await database.transaction([(INSERT, [(1, "rider")])])
                returned.append("rider")

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_the_lock, database, release)
            # The first in line for the lock commits everything waiting, the rider's rows with its own.
            nursery.start_soon(database.transaction, [(INSERT, [(n, "x" * 100) for n in range(100, 20_000)])])
            await trio.sleep(0.01)
            nursery.start_soon(rider)
            await trio.sleep(0.01)
            release.set()
            while database._waiting:                     # until the group (with the rider's rows) is taken
                await trio.sleep(0)
            rider_scope.cancel()
        assert returned == ["rider"]
        assert await database.fetchone("SELECT v FROM t WHERE id = 1") == ("rider",)


async def test_a_failing_disk_fails_every_transaction_of_the_group_and_writes_nothing(tmp_path):
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        await database.execute("PRAGMA query_only = 1")           # every write now fails, as on a failing disk
        errors: list[BaseException] = []

        async def write(n: int) -> None:
            try:
                await database.transaction([(INSERT, [(n, "x")])])
            except StoreError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(write, n)
        assert len(errors) == 12 and all("readonly" in str(exc) for exc in errors)
        await database.execute("PRAGMA query_only = 0")
        assert await count_rows(database) == 0


async def test_peek_reads_what_was_committed(tmp_path):
    async with open_database(tmp_path / "db.sqlite") as database:
        await database.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        assert await database.peek("SELECT v FROM t WHERE id = ?", (1,)) is None
        await database.transaction([(INSERT, [(1, "one")])])
        assert await database.peek("SELECT v FROM t WHERE id = ?", (1,)) == ("one",)
        with pytest.raises(StoreError, match="no such table"):
            await database.peek("SELECT v FROM missing")
