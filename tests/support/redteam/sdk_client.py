"""The official Python MCP client (PyPI `mcp`, 1.x or 2.x), unmodified, reporting all it got.

  sdk_client.py --url URL [--tool leak] [--timeout 3]
  sdk_client.py --url-template TEMPLATE --framings a,b,c [--tool leak] [--timeout 3]

Run with a venv holding `mcp` (see REQUIREMENTS.md); trust a test CA with SSL_CERT_FILE=ca.pem.
One session connects over streamable HTTP (mcp 2.x: `Client` in its default connect mode; mcp 1.x:
`streamable_http_client` + `ClientSession`), lists the tools, calls --tool with no arguments and
ends. With --url there is one session and one JSON line:

  {"ok": bool, "result": {...}, "error": str | None}

With --url-template (which holds `{framing}`) and --framings, there is one fresh session per
framing, run one after the other in this process, each at TEMPLATE with `{framing}` replaced by
the name, and one JSON line per framing, in the order given, with "framing": NAME first.

`result` holds everything the SDK handed to the application: "tools" (the tools/list result),
"call" (the tools/call result), "messages" (every notification, server request or exception given
to the message handler), "logging" (every notifications/message given to the logging callback)
and "sdk_log" (every record of level WARNING or above that the SDK, or a library it uses, logged
while the session ran: otherwise stderr). `error` is the full text of the exception the session
raised: its JSON-RPC error data, pydantic validation errors with their whole input, sub-exceptions
and causes. --timeout bounds a session (connect, list, call) in seconds; each request may wait a
third of it for its answer. A session that outlives its timeout is reported with a TimeoutError
and left behind; the next one starts regardless.
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
from contextlib import asynccontextmanager
from datetime import timedelta

LEFT_BEHIND_GRACE = 0.5
"""Seconds a timed-out session gets to finish its cancellation before it is left behind."""


def dump(value):
    """A JSON-friendly form of whatever the SDK produced."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, BaseException):
        return describe(value)
    return repr(value)


def describe(exc, depth=0):
    """Exception text in full: JSON-RPC error data, validation errors with their input,
    every sub-exception of a group, and the chain of causes."""
    from pydantic import ValidationError

    text = f"{type(exc).__name__}: {exc}"
    error = getattr(exc, "error", None)
    if hasattr(error, "model_dump"):
        text += f" {json.dumps(error.model_dump(mode='json'))}"
    if isinstance(exc, ValidationError):
        text += f" {json.dumps(exc.errors(include_url=False), default=repr)}"
    if depth < 8:
        for sub in getattr(exc, "exceptions", ()):
            text += f" [{describe(sub, depth + 1)}]"
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if cause is not None:
            text += f" (from {describe(cause, depth + 1)})"
    return text


class SdkLog(logging.Handler):
    """Collects log records into the list `sink` (the running session's "sdk_log")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.sink = []

    def emit(self, record):
        self.sink.append(self.format(record))


def connector():
    """A function (url, request_timeout, out) -> async context manager yielding an initialized
    session that reports to `out`, for the installed SDK line."""
    try:
        from mcp import Client  # mcp 2.x
    except ImportError:
        return connect_v1

    def connect(url, request_timeout, out):
        on_message, on_logging = handlers(out)
        return Client(url, read_timeout_seconds=request_timeout, message_handler=on_message, logging_callback=on_logging)

    return connect


def handlers(out):
    """The message handler and the logging callback, recording into out["result"]."""

    async def on_message(message):
        out["result"]["messages"].append(dump(message))

    async def on_logging(params):
        out["result"]["logging"].append(dump(params))

    return on_message, on_logging


@asynccontextmanager
async def connect_v1(url, request_timeout, out):
    """mcp 1.x: streamable_http_client + ClientSession + initialize()."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    on_message, on_logging = handlers(out)
    async with streamable_http_client(url) as (read, write, _):
        wait = timedelta(seconds=request_timeout)
        async with ClientSession(read, write, wait, message_handler=on_message, logging_callback=on_logging) as session:
            await session.initialize()
            yield session


async def session(connect, url, tool, timeout, out):
    """Connect, list the tools, call `tool`, within `timeout` seconds, reporting to `out`."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline, connect(url, timeout / 3, out) as client:
            out["result"]["tools"] = dump(await client.list_tools())
            out["result"]["call"] = dump(await client.call_tool(tool, {}))
            out["ok"] = True
    except BaseException as e:
        if deadline.expired():
            raise TimeoutError(f"the session did not finish within {timeout} s") from e
        raise


def run_one(connect, log, url, tool, timeout):
    """One session in a thread of its own (own event loop); its report, once it ended or timed out."""
    out = {"ok": False, "result": {"tools": None, "call": None, "messages": [], "logging": [], "sdk_log": []}, "error": None}
    log.sink = out["result"]["sdk_log"]

    def target():
        try:
            asyncio.run(session(connect, url, tool, timeout, out))
        except BaseException as e:  # reported in the JSON line, never raised
            out["error"] = describe(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout + LEFT_BEHIND_GRACE)
    if thread.is_alive():
        out["error"] = f"TimeoutError: the session did not finish within {timeout} s and was left behind"
    return out, thread


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="the MCP endpoint of one session")
    target.add_argument("--url-template", help="an MCP endpoint URL holding {framing}; needs --framings")
    p.add_argument("--framings", help="comma-separated framing names, one session each")
    p.add_argument("--tool", default="leak")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per session (default 3)")
    args = p.parse_args()
    if args.url_template is not None and ("{framing}" not in args.url_template or not args.framings):
        p.error("--url-template needs {framing} in it and --framings")
    if args.url is not None and args.framings is not None:
        p.error("--framings goes with --url-template")
    sessions = [(None, args.url)] if args.url else [(f, args.url_template.replace("{framing}", f)) for f in args.framings.split(",")]
    connect, log = connector(), SdkLog()
    logging.getLogger().addHandler(log)
    threads = []
    for framing, url in sessions:
        out, thread = run_one(connect, log, url, args.tool, args.timeout)
        threads.append(thread)
        line = {"framing": framing, **out} if framing is not None else out
        print(json.dumps(line), flush=True)
    if any(t.is_alive() for t in threads):
        os._exit(0)  # a session left behind must not keep the process alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
