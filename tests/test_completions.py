"""Completions (immucore/server/completions.py): writer futures resolved on the event loop,
with one loop wake-up for everything a commit resolved."""
import asyncio
import threading
from concurrent.futures import Future

import pytest

from immucore.server.completions import Completions


def test_results_and_errors_arrive_with_one_wake_up_per_commit():
    async def main():
        loop = asyncio.get_running_loop()
        completions = Completions(loop)
        writer_futures = [Future() for _ in range(50)]
        for f in writer_futures:
            f.set_running_or_notify_cancel()
        waiters = [completions.wrap(f) for f in writer_futures]
        wake_ups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wake_ups.append(a), real(*a))[1]

        def commit():                   # the committer resolves a whole batch at once
            for n, f in enumerate(writer_futures):
                if n == 7:
                    f.set_exception(ValueError("bad tx"))
                else:
                    f.set_result([n])

        thread = threading.Thread(target=commit)
        thread.start()
        thread.join()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        del loop.call_soon_threadsafe
        assert len(wake_ups) == 1
        assert isinstance(results[7], ValueError)
        assert [r for n, r in enumerate(results) if n != 7] == [[n] for n in range(50) if n != 7]

    asyncio.run(main())


def test_cancelling_the_waiter_cancels_a_write_not_yet_taken():
    async def main():
        completions = Completions(asyncio.get_running_loop())
        queued, taken = Future(), Future()
        taken.set_running_or_notify_cancel()          # the writer already has this one
        waiters = [completions.wrap(queued), completions.wrap(taken)]
        for waiter in waiters:
            waiter.cancel()
        await asyncio.sleep(0)
        assert queued.cancelled()
        assert not taken.cancelled()
        taken.set_result([1])                         # its late result is dropped quietly
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.CancelledError):
            await waiters[1]

    asyncio.run(main())


def test_a_failing_delivery_does_not_strand_the_rest_of_its_commit():
    async def main():
        completions = Completions(asyncio.get_running_loop())
        delivered = []

        def deliver(n, headers, exc):
            if n == 1:
                raise RuntimeError("a broken callback")
            delivered.append((n, headers))

        on_done = [completions.on_loop(lambda headers, exc, n=n: deliver(n, headers, exc))
                   for n in range(3)]
        thread = threading.Thread(target=lambda: [done([n], None)
                                                  for n, done in enumerate(on_done)])
        thread.start()
        thread.join()
        await asyncio.sleep(0.05)
        return delivered

    assert asyncio.run(main()) == [(0, [0]), (2, [2])]


def test_a_writer_callback_runs_its_function_on_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        completions = Completions(loop)
        seen = []
        on_done = completions.on_loop(
            lambda headers, exc: seen.append((headers, exc, threading.current_thread())))
        error = ValueError("bad tx")
        thread = threading.Thread(target=lambda: (on_done([1], None), on_done(None, error)))
        thread.start()
        thread.join()
        assert seen == []                     # nothing runs on the writer's thread
        await asyncio.sleep(0.05)
        return seen, error

    seen, error = asyncio.run(main())
    assert [(h, e) for h, e, _ in seen] == [([1], None), (None, error)]
    assert all(t is threading.main_thread() for _, _, t in seen)
