"""OpenAIBackend's HTTP layer against loopback servers that misbehave on purpose: whole bodies however they
are written, deadlines, cancellation, invalid replies, size limits and secrets in URLs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
from mepg_planner_testing import free_port
from misbehaving_http import MisbehavingEndpoint

from mepg_core.planner import http_client
from mepg_core.planner.backends import (
    BackendError,
    CallInterrupted,
    EndpointBadResponseError,
    EndpointHTTPError,
    EndpointResponseTooLargeError,
    EndpointTimeoutError,
    EndpointUnreachableError,
    OpenAIBackend,
)
from mepg_core.planner.chain import aplan_with_backend, plan_with_backend

MESSAGES = [{"role": "user", "content": "Plan a cat."}]


def both(backend: OpenAIBackend):
    """The sync and the async call of one backend, as two callables."""
    return [lambda: backend.generate(MESSAGES), lambda: asyncio.run(backend.agenerate(MESSAGES))]


@pytest.mark.parametrize("mode", ["ok", "split", "chunked"])
def test_the_whole_answer_is_read_however_it_is_written(mode):
    with MisbehavingEndpoint(mode) as ep:
        for call in both(OpenAIBackend(ep.url, "m", max_retries=0, timeout=10)):
            assert call() == '{"answer": "ok"}'


def test_a_server_that_never_answers_meets_the_deadline_once():
    with MisbehavingEndpoint("never") as ep:
        backend = OpenAIBackend(ep.url, "m", timeout=1.0, max_retries=3, backoff=0.01)
        for call in both(backend):
            started = time.perf_counter()
            with pytest.raises(EndpointTimeoutError, match=r"did not answer within 1 s$"):
                call()
            assert 0.9 < time.perf_counter() - started < 1.8
        assert ep.requests == 2  # the deadline is the call's, retries included: no second attempt each


def test_a_trickling_answer_cannot_outlive_the_deadline():
    with MisbehavingEndpoint("drip") as ep:
        started = time.perf_counter()
        with pytest.raises(EndpointTimeoutError):
            OpenAIBackend(ep.url, "m", timeout=0.8, max_retries=0).generate(MESSAGES)
        assert time.perf_counter() - started < 1.5


@pytest.mark.parametrize("run_async", [False, True])
def test_cancel_ends_a_stuck_call_at_once_and_closes_the_connection(run_async):
    cancel = threading.Event()
    with MisbehavingEndpoint("never") as ep:
        backend = OpenAIBackend(ep.url, "m", timeout=60, should_cancel=cancel.is_set)
        threading.Timer(0.5, cancel.set).start()
        started = time.perf_counter()
        with pytest.raises(CallInterrupted, match="interrupted"):
            backend.generate(MESSAGES) if not run_async else asyncio.run(backend.agenerate(MESSAGES))
        latency = time.perf_counter() - started - 0.5
        assert latency < 0.5, latency
        assert ep.closed_by_client.wait(2), "the socket stayed open after the cancel"


def test_the_event_loop_runs_while_a_call_waits():
    ticks = []

    async def ticker():
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.05)

    async def main(url):
        task = asyncio.create_task(ticker())
        with pytest.raises(EndpointTimeoutError):
            await OpenAIBackend(url, "m", timeout=0.6, max_retries=0).agenerate(MESSAGES)
        task.cancel()

    with MisbehavingEndpoint("never") as ep:
        asyncio.run(main(ep.url))
    assert len(ticks) >= 8


def test_cancel_during_a_retry_wait():
    cancel = threading.Event()
    with MisbehavingEndpoint("http500") as ep:
        backend = OpenAIBackend(ep.url, "m", timeout=60, max_retries=5, backoff=5, should_cancel=cancel.is_set)
        threading.Timer(0.3, cancel.set).start()
        started = time.perf_counter()
        with pytest.raises(CallInterrupted):
            backend.generate(MESSAGES)
        assert time.perf_counter() - started < 1.0
        assert ep.requests == 1


def test_retries_stop_where_the_deadline_would_pass():
    with MisbehavingEndpoint("http500") as ep:
        started = time.perf_counter()
        with pytest.raises(EndpointHTTPError, match=r"HTTP 500: 'model exploded' \(after 2 attempts\)"):
            OpenAIBackend(ep.url, "m", timeout=1.0, max_retries=10, backoff=0.4).generate(MESSAGES)
        # waits 0.4 s; a wait of 0.8 s more would pass the deadline: two attempts in about 0.4 s
        assert time.perf_counter() - started < 1.2 and ep.requests == 2


@pytest.mark.parametrize("mode", ["huge_length", "huge_chunked"])
def test_an_answer_past_the_size_limit_is_refused(mode):
    with MisbehavingEndpoint(mode) as ep:
        for call in both(OpenAIBackend(ep.url, "m", timeout=20, max_retries=2)):
            started = time.perf_counter()
            with pytest.raises(EndpointResponseTooLargeError, match="8388608"):
                call()
            assert time.perf_counter() - started < 10
        assert ep.requests == 2  # not retried


@pytest.mark.parametrize("mode, match", [
    ("garbage", "invalid HTTP answer"),
    ("bad_chunk", "incomplete answer|invalid HTTP answer"),
    ("truncated", "incomplete answer"),
    ("close", "closed it without an HTTP answer"),
    ("html", "did not answer JSON"),
])
def test_invalid_replies_are_named_as_such_and_not_retried(mode, match):
    with MisbehavingEndpoint(mode) as ep:
        for call in both(OpenAIBackend(ep.url, "m", timeout=10, max_retries=3, backoff=0.01)):
            with pytest.raises(EndpointBadResponseError, match=match) as info:
                call()
            assert "cannot reach" not in str(info.value)
        assert ep.requests == 2  # one per call: an invalid answer is not retried


def test_nothing_listening_is_unreachable_and_retried():
    port = free_port()
    backend = OpenAIBackend(f"http://127.0.0.1:{port}", "m", max_retries=2, backoff=0.01, timeout=5)
    for call in both(backend):
        with pytest.raises(EndpointUnreachableError, match=f"cannot reach http://127.0.0.1:{port}.*after 3 attempts"):
            call()


@pytest.mark.parametrize("url", [
    "http://user:sk-SECRET-123@127.0.0.1:8080/v1",
    "http://sk-SECRET-123@127.0.0.1:8080/v1",
    "https://:sk-SECRET-123@api.example.com/v1",
    "sk-SECRET-123",
    "ftp://sk-SECRET-123",
    "http://127.0.0.1:99999sk-SECRET-123/v1",
])
def test_secrets_in_the_url_are_refused_without_being_echoed(url):
    with pytest.raises(BackendError) as info:
        OpenAIBackend(url, "m")
    assert "SECRET" not in str(info.value)


def test_query_values_never_reach_messages_logs_or_cache_keys(caplog):
    caplog.set_level(logging.DEBUG)
    with MisbehavingEndpoint("http500") as ep:
        backend = OpenAIBackend(ep.url + "?api_key=sk-SECRET-123&v=2", "m", max_retries=1, backoff=0.01)
        assert backend.url == ep.url + "/chat/completions?api_key=***&v=***"
        with pytest.raises(EndpointHTTPError) as info:
            backend.generate(MESSAGES)
        other = OpenAIBackend(ep.url + "?api_key=OTHER&v=2", "m")
    for text in (str(info.value), caplog.text, repr(backend), backend.cache_key()):
        assert "SECRET" not in text
    assert backend.cache_key() != other.cache_key()  # the full URL still tells the two apart (as a digest)


def test_the_budget_checks_before_any_work():
    budget = http_client.CallBudget(10, should_cancel=lambda: True)
    with pytest.raises(CallInterrupted):
        http_client.post(http_client.Target.parse("http://127.0.0.1:9/x"), b"", {}, budget=budget, max_bytes=10)


@pytest.mark.parametrize("on_backend_error", ["raise", "fallback"])
def test_an_interrupt_stops_the_plan_and_never_falls_back(on_backend_error):
    cancel = threading.Event()
    with MisbehavingEndpoint("never") as ep:
        backend = OpenAIBackend(ep.url, "m", timeout=60, should_cancel=cancel.is_set)
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(CallInterrupted):
            plan_with_backend("a red apple", backend, on_backend_error=on_backend_error)
        cancel.clear()
        threading.Timer(0.3, cancel.set).start()
        with pytest.raises(CallInterrupted):
            asyncio.run(aplan_with_backend("a red apple", backend, on_backend_error=on_backend_error))
