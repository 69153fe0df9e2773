"""The supervisor of background loops: a loop that raises is logged, counted and restarted with back-off; it never
ends the process, and cancellation still ends it at once."""

import trio

from llorch.node.lifecycle import supervise


async def test_a_failing_loop_is_restarted_with_back_off_and_counted(autojump_clock):
    runs: list[float] = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 4:
            raise ValueError(f"fault {len(runs)}")
        await trio.sleep_forever()

    restarts: list[str] = []
    with trio.move_on_after(100):
        await supervise("flaky", flaky, restarts.append, backoff_s_initial=1.0, backoff_s_max=8.0)
    assert restarts == ["flaky"] * 3
    gaps = [later - earlier for earlier, later in zip(runs, runs[1:])]
    assert gaps == [1.0, 2.0, 4.0]                       # doubling back-off


async def test_an_exception_group_from_a_nursery_inside_the_loop_is_survived(autojump_clock):
    calls = 0

    async def loop_with_nursery() -> None:
        nonlocal calls
        calls += 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            raise KeyError("inside a nursery")

    with trio.move_on_after(10):
        await supervise("nursery", loop_with_nursery, None, backoff_s_initial=1.0, backoff_s_max=1.0)
    assert calls >= 5


async def test_cancellation_ends_the_supervisor():
    async def forever() -> None:
        await trio.sleep_forever()

    with trio.move_on_after(0.05) as scope:
        await supervise("forever", forever)
    assert scope.cancelled_caught
