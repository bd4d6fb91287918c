"""SIGTERM under load: the frontend ends requests vLLM's shutdown leaves waiting (plugin/shutdown.py).

No engine here: a real vLLM OutputProcessor with a request waiting on its real
RequestOutputCollector, on a running event loop, shut down from another thread as
vLLM's API server does. The end-to-end check (a real server, SIGTERM during
streaming) is tests/test_reliability_server.py. Also the vLLM internals this relies on.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from types import SimpleNamespace

import pytest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector

from vllm_adaptive_kv.plugin.shutdown import end_in_flight_requests, install_request_ending_shutdown


def test_vllm_internals_we_rely_on():
    # AsyncLLM.shutdown(timeout) cancels self.output_handler, an asyncio task made in
    # _run_output_handler; OutputProcessor.propagate_error puts an exception in every
    # request_states[...].queue. If one of these moves, plugin/shutdown.py must follow.
    assert list(inspect.signature(AsyncLLM.shutdown).parameters) == ["self", "timeout"]
    assert "self.output_handler = asyncio.create_task" in inspect.getsource(AsyncLLM._run_output_handler)
    assert "output_handler" in inspect.getsource(AsyncLLM.shutdown)
    assert "state.queue.put(e)" in inspect.getsource(OutputProcessor.propagate_error)
    assert "request_states" in inspect.getsource(OutputProcessor.__init__)


def test_a_waiting_request_gets_engine_dead_error_from_a_shutdown_in_another_thread():
    async def scenario():
        processor = OutputProcessor(None, log_stats=False)
        queue = RequestOutputCollector(RequestOutputKind.DELTA, "req-1")
        processor.request_states["req-1"] = SimpleNamespace(queue=queue)
        handler = asyncio.create_task(asyncio.sleep(3600))  # stands for vLLM's output handler task
        engine = SimpleNamespace(output_processor=processor)
        waiter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        thread = threading.Thread(target=end_in_flight_requests, args=(engine, handler))
        thread.start()  # the API server runs AsyncLLM.shutdown in an executor thread
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(waiter, 10)
        thread.join()
        handler.cancel()

    asyncio.run(scenario())


def test_nothing_to_end_and_a_closed_loop_are_fine():
    processor = OutputProcessor(None, log_stats=False)
    loop = asyncio.new_event_loop()
    handler = loop.create_task(asyncio.sleep(0))
    loop.run_until_complete(handler)
    end_in_flight_requests(SimpleNamespace(output_processor=processor), handler)  # no request
    processor.request_states["r"] = SimpleNamespace(queue=None)
    loop.close()
    end_in_flight_requests(SimpleNamespace(output_processor=processor), handler)  # closed loop
    end_in_flight_requests(SimpleNamespace(), None)  # shutdown before the handler existed


def test_the_wrapper_is_installed_once_and_keeps_vllms_shutdown(monkeypatch):
    calls = []
    monkeypatch.setattr(AsyncLLM, "shutdown", lambda self, timeout=None: calls.append(timeout))
    install_request_ending_shutdown()
    wrapped = AsyncLLM.shutdown
    install_request_ending_shutdown()
    assert AsyncLLM.shutdown is wrapped
    AsyncLLM.shutdown(SimpleNamespace(), 5)
    assert calls == [5]
