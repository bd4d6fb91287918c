"""End in-flight requests when ``vllm serve`` shuts down, so SIGTERM under load ends it.

vLLM 0.32's ``AsyncLLM.shutdown`` stops the engine core (SIGTERM; with
``--shutdown-timeout T`` it waits up to T seconds, then kills it), then cancels
the task that hands engine outputs to the waiting requests. A request still in
flight at that moment waits for an output that never comes: its HTTP response
stays open, uvicorn's graceful shutdown waits for every connection to close,
and the server outlives SIGTERM for as long as its clients keep their streams
open. The engine core's own drain rarely beats its kill on a busy CPU (it sees
the signal only between steps), and with the default ``--shutdown-timeout 0``
it never does. Measured the same on vanilla vLLM 0.32 CPU (docs/reliability.md).

With a kv policy configured, the frontend's ``AsyncLLM.shutdown`` is wrapped:
after vLLM's own shutdown, every request still in flight gets ``EngineDeadError``
on the event loop that serves it, exactly as vLLM's output handler does when an
engine dies. Each stream then ends with an error event, its connection closes,
and the server exits. Requests that finished in the grace period are untouched.
"""

from __future__ import annotations

_MARK = "_adaptive_kv_ends_requests"


def install_request_ending_shutdown() -> None:
    """Wrap ``AsyncLLM.shutdown`` once per process (frontend; called only with a kv policy)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    original = AsyncLLM.shutdown
    if getattr(original, _MARK, False):
        return

    def shutdown(self, timeout: float | None = None) -> None:
        handler = getattr(self, "output_handler", None)  # vLLM's shutdown cancels it
        original(self, timeout)
        end_in_flight_requests(self, handler)

    setattr(shutdown, _MARK, True)
    shutdown.__doc__ = original.__doc__
    AsyncLLM.shutdown = shutdown


def end_in_flight_requests(engine, handler) -> None:
    """Hand ``EngineDeadError`` to every request ``engine`` still tracks, on its event loop.

    ``shutdown`` runs in an executor thread, and the requests wait on asyncio
    events of the server's loop, so the error is scheduled on that loop.
    """
    processor = getattr(engine, "output_processor", None)
    if handler is None or processor is None or not processor.request_states:
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    loop = handler.get_loop()
    try:
        loop.call_soon_threadsafe(processor.propagate_error, EngineDeadError())
    except RuntimeError:  # the loop is already closed: nothing waits on it any more
        pass
