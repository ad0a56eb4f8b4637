#!/usr/bin/env python3
"""Interop check: talk to llmq the way a RabbitMQ tutorial client would.

This is deliberately written like the aio-pika RPC tutorial, not like llmq's
own client, to prove that an ordinary third-party producer works against a
broker whose topology the llmq worker declared:

* it re-declares the processing queue with only ``x-max-priority`` (no
  dead-letter arguments). llmq puts dead-lettering in a *policy* precisely so
  that this does not fail with PRECONDITION_FAILED;
* it sends the minimal "seed" request body ``{"prompt", "timestamp"}`` and
  asks for the answer on an exclusive reply queue via ``reply_to`` and
  ``correlation_id``.

Environment (all optional):
    AMQP_URL               amqp://llmq:llmq@127.0.0.1:5672/%2f
    LLMQ_REQUEST_EXCHANGE  llm_requests
    LLMQ_PROCESSING_QUEUE  llm_processing
    LLMQ_ROUTING_KEY       process
    TIMEOUT_SECS           30   (how long to wait for the reply)
    PROMPT                 "Hello from Python"

Prints ``interop ok: request_id=... content=...`` and exits 0 on success;
prints the problem to stderr and exits 1 otherwise (timeout, error status,
malformed reply, broker refusing a declaration...).

    pip install -r tests/interop/requirements.txt
    python tests/interop/tutorial_client.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

AMQP_URL = os.environ.get("AMQP_URL", "amqp://llmq:llmq@127.0.0.1:5672/%2f")
REQUEST_EXCHANGE = os.environ.get("LLMQ_REQUEST_EXCHANGE", "llm_requests")
PROCESSING_QUEUE = os.environ.get("LLMQ_PROCESSING_QUEUE", "llm_processing")
ROUTING_KEY = os.environ.get("LLMQ_ROUTING_KEY", "process")
TIMEOUT_SECS = float(os.environ.get("TIMEOUT_SECS", "30"))
PROMPT = os.environ.get("PROMPT", "Hello from Python")

# Must match what the worker declares, or the broker answers PRECONDITION_FAILED.
QUEUE_ARGUMENTS = {"x-max-priority": 10}
REQUEST_PRIORITY = 7


def redacted(url: str) -> str:
    """The URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{parts.username}:***@{host}"
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def fail(problem: str) -> int:
    print(f"interop FAILED: {problem}", file=sys.stderr)
    return 1


def check_reply(message: AbstractIncomingMessage) -> int:
    """Validate one reply; return the process exit code."""
    try:
        reply = json.loads(message.body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return fail(f"reply is not JSON ({exc}): {message.body[:500]!r}")
    if not isinstance(reply, dict):
        return fail(f"reply is not a JSON object: {reply!r}")

    status = reply.get("status")
    if status != "ok":
        return fail(f"reply status is {status!r}, expected 'ok': {reply!r}")
    content = reply.get("content")
    if not isinstance(content, str) or not content.strip():
        return fail(f"reply content is not a non-empty string: {reply!r}")

    request_id = reply.get("request_id") or message.correlation_id
    print(f"interop ok: request_id={request_id} content={content!r}")
    return 0


async def run() -> int:
    try:
        connection = await aio_pika.connect_robust(AMQP_URL, timeout=TIMEOUT_SECS)
    except Exception as exc:  # noqa: BLE001 - any connect failure is fatal here
        return fail(f"cannot connect to {redacted(AMQP_URL)}: {exc!r}")

    async with connection:
        # Publisher confirms (aio-pika's default) plus on_return_raises: a
        # request that no queue is bound for fails loudly instead of vanishing.
        channel = await connection.channel(on_return_raises=True)

        # Tutorial-style declaration of the work queue: durable, priority only.
        try:
            await channel.declare_queue(
                PROCESSING_QUEUE,
                durable=True,
                arguments=QUEUE_ARGUMENTS,
            )
        except aio_pika.exceptions.ChannelClosed as exc:
            return fail(
                f"declaring queue {PROCESSING_QUEUE!r} with {QUEUE_ARGUMENTS} "
                f"was refused: {exc}"
            )

        # The exchange belongs to the worker: look it up (passive declare), do
        # not create it with possibly different settings.
        try:
            exchange = await channel.get_exchange(REQUEST_EXCHANGE, ensure=True)
        except aio_pika.exceptions.ChannelClosed as exc:
            return fail(
                f"exchange {REQUEST_EXCHANGE!r} does not exist "
                f"(no worker has declared the topology yet?): {exc}"
            )

        # Private reply queue: server-named, exclusive, deleted with us.
        reply_queue = await channel.declare_queue(
            "", exclusive=True, auto_delete=True
        )

        correlation_id = str(uuid.uuid4())
        loop = asyncio.get_running_loop()
        reply_future: asyncio.Future[AbstractIncomingMessage] = loop.create_future()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            async with message.process():
                if message.correlation_id != correlation_id:
                    print(
                        "ignoring reply with unexpected correlation_id "
                        f"{message.correlation_id!r}",
                        file=sys.stderr,
                    )
                    return
                if not reply_future.done():
                    reply_future.set_result(message)

        # Consume before publishing so a fast reply cannot be missed.
        await reply_queue.consume(on_reply)

        body = json.dumps({"prompt": PROMPT, "timestamp": time.time()}).encode()
        message = aio_pika.Message(
            body=body,
            content_type="application/json",
            priority=REQUEST_PRIORITY,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            reply_to=reply_queue.name,
            correlation_id=correlation_id,
        )
        try:
            # mandatory=True is aio-pika's default for publish().
            await exchange.publish(message, routing_key=ROUTING_KEY)
        except aio_pika.exceptions.DeliveryError as exc:
            return fail(
                f"request to exchange {REQUEST_EXCHANGE!r} with key "
                f"{ROUTING_KEY!r} was not routed to any queue: {exc}"
            )

        try:
            reply = await asyncio.wait_for(reply_future, timeout=TIMEOUT_SECS)
        except asyncio.TimeoutError:
            return fail(
                f"timed out after {TIMEOUT_SECS:g}s waiting for a reply with "
                f"correlation_id={correlation_id} on {reply_queue.name} "
                f"(is an llmq worker consuming {PROCESSING_QUEUE!r}?)"
            )
        return check_reply(reply)


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
