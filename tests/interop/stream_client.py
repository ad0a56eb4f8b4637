#!/usr/bin/env python3
"""Streaming from llmq with aio-pika: print the answer's tokens as they arrive.

A request with ``"stream": true`` and a ``reply_to`` gets, on that queue and with
its ``correlation_id``:

* delta messages (AMQP ``type`` ``delta``):
  ``{"request_id", "status": "delta", "attempt", "seq", "delta": {"content": ...}}``,
  ``seq`` counting from 0 in each attempt;
* a restart marker (``type`` ``restart``) ``{"request_id", "status": "restart",
  "attempt"}`` when an attempt broke off and a new one starts: drop the text
  received so far;
* then the result (``type`` ``llmq.result``), whose ``content`` is the whole
  answer, equal to the deltas joined.

Environment (all optional):
    AMQP_URL               amqp://llmq:llmq@127.0.0.1:5672/%2f
    LLMQ_REQUEST_EXCHANGE  llm_requests
    LLMQ_ROUTING_KEY       process
    TIMEOUT_SECS           30   (how long to wait for the result)
    PROMPT                 "Tell me a story"

Prints the tokens on stdout as they come, then ``stream ok: deltas=N
restarts=R content=...``, and exits 0; prints the problem to stderr and exits 1
otherwise (a delta out of order, a result that differs from the deltas, a
timeout, an error result).

    pip install -r tests/interop/requirements.txt
    python tests/interop/stream_client.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

AMQP_URL = os.environ.get("AMQP_URL", "amqp://llmq:llmq@127.0.0.1:5672/%2f")
REQUEST_EXCHANGE = os.environ.get("LLMQ_REQUEST_EXCHANGE", "llm_requests")
ROUTING_KEY = os.environ.get("LLMQ_ROUTING_KEY", "process")
TIMEOUT_SECS = float(os.environ.get("TIMEOUT_SECS", "30"))
PROMPT = os.environ.get("PROMPT", "Tell me a story")


class Stream:
    """The answer as it arrives: the text of the current attempt."""

    def __init__(self) -> None:
        self.text = ""
        self.attempt = None
        self.next_seq = 0
        self.deltas = 0
        self.restarts = 0
        self.problem = None

    def delta(self, message: dict) -> None:
        if self.attempt is None:
            self.attempt = message["attempt"]
        if message["attempt"] != self.attempt or message["seq"] != self.next_seq:
            self.problem = (
                f"expected attempt {self.attempt} seq {self.next_seq}, got {message!r}"
            )
            return
        self.next_seq += 1
        self.deltas += 1
        token = message["delta"].get("content") or ""
        self.text += token
        print(token, end="", flush=True)

    def restart(self, message: dict) -> None:
        # An attempt broke off: what it said is void; the next one starts at seq 0.
        self.restarts += 1
        self.attempt = message["attempt"]
        self.next_seq = 0
        self.text = ""
        print(f"\n[attempt {self.attempt} starts again]", flush=True)


def fail(problem: str) -> int:
    print(f"\nstream FAILED: {problem}", file=sys.stderr)
    return 1


async def run() -> int:
    connection = await aio_pika.connect_robust(AMQP_URL, timeout=TIMEOUT_SECS)
    async with connection:
        channel = await connection.channel(on_return_raises=True)
        exchange = await channel.get_exchange(REQUEST_EXCHANGE, ensure=True)
        reply_queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        correlation_id = str(uuid.uuid4())
        stream = Stream()
        done: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

        async def on_message(message: AbstractIncomingMessage) -> None:
            async with message.process():
                if message.correlation_id != correlation_id or done.done():
                    return
                body = json.loads(message.body)
                if message.type == "delta":
                    stream.delta(body)
                elif message.type == "restart":
                    stream.restart(body)
                else:
                    done.set_result(body)

        await reply_queue.consume(on_message)
        await exchange.publish(
            aio_pika.Message(
                body=json.dumps({"prompt": PROMPT, "stream": True}).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                reply_to=reply_queue.name,
                correlation_id=correlation_id,
            ),
            routing_key=ROUTING_KEY,
        )
        try:
            result = await asyncio.wait_for(done, timeout=TIMEOUT_SECS)
        except asyncio.TimeoutError:
            return fail(f"no result within {TIMEOUT_SECS:g}s")
    print()
    if stream.problem:
        return fail(stream.problem)
    if result.get("status") != "ok":
        return fail(f"result is not ok: {result!r}")
    if result.get("content") != stream.text:
        return fail(f"deltas {stream.text!r} differ from the result {result!r}")
    if stream.deltas == 0:
        return fail("no delta arrived before the result")
    print(
        f"stream ok: deltas={stream.deltas} restarts={stream.restarts} "
        f"content={stream.text!r}"
    )
    return 0


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
