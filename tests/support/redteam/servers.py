"""Real Python MCP servers (streamable HTTP at /mcp) that red-team requests try to trick.

  servers.py --sdk mcp2|mcp1|fastmcp --port P [--cert C --key K] --marker FILE
             [--hostname mcp.internal.test] [--json-response]

Run it with the venv of the SDK named by --sdk (PyPI `mcp` 2.x, `mcp` 1.x, or `fastmcp`; see
REQUIREMENTS.md). Every server binds 127.0.0.1 only, speaks TLS when --cert is given, accepts
Host headers naming --hostname (or 127.0.0.1/localhost) and offers two tools:

  safe(text)       returns text
  dangerous(text)  appends {"sdk": SDK, "text": text} as one JSON line to --marker, returns "ran"

A proxy that blocks `dangerous` is bypassed exactly when a line appears in the marker file.
"""

import argparse
import json
import os
import sys

HOST = "127.0.0.1"


def record(marker, sdk, text):
    """Append one JSON line to the marker file (O_APPEND: concurrent calls never interleave)."""
    line = (json.dumps({"sdk": sdk, "text": text}) + "\n").encode()
    fd = os.open(marker, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def add_tools(server, args):
    """Register `safe` and `dangerous` on a FastMCP-style server object (all three SDKs)."""

    @server.tool()
    def safe(text: str) -> str:
        """Return the text unchanged."""
        return text

    @server.tool()
    def dangerous(text: str) -> str:
        """A tool the policy blocks: record that it ran."""
        record(args.marker, args.sdk, text)
        return "ran"


def allowed_hosts(args):
    return [f"{h}:{p}" for h in (args.hostname, HOST, "localhost") for p in (args.port, "*")]


def build_app(args):
    """The SDK's own ASGI app for streamable HTTP, as its documentation deploys it."""
    if args.sdk == "fastmcp":
        from fastmcp import FastMCP

        server = FastMCP("redteam-fastmcp")
        add_tools(server, args)
        return server.http_app(
            path="/mcp",
            transport="http",
            json_response=args.json_response,
            host_origin_protection=True,
            allowed_hosts=[args.hostname, HOST, "localhost"],
        )
    from mcp.server.transport_security import TransportSecuritySettings

    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=allowed_hosts(args),
        allowed_origins=[f"https://{args.hostname}:{args.port}"],
    )
    if args.sdk == "mcp2":
        from mcp.server.mcpserver import MCPServer

        server = MCPServer("redteam-mcp2")
        add_tools(server, args)
        return server.streamable_http_app(
            json_response=args.json_response, transport_security=security, host=args.hostname
        )
    from mcp.server.fastmcp import FastMCP

    server = FastMCP(
        "redteam-mcp1",
        host=HOST,
        json_response=args.json_response,
        transport_security=security,
    )
    add_tools(server, args)
    return server.streamable_http_app()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sdk", choices=["mcp2", "mcp1", "fastmcp"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", help="PEM certificate chain; without it the server speaks plain HTTP")
    p.add_argument("--key", help="PEM private key of --cert")
    p.add_argument("--marker", required=True, help="file that `dangerous` appends a JSON line to")
    p.add_argument("--hostname", default="mcp.internal.test", help="name the Host allow-list accepts")
    p.add_argument("--json-response", action="store_true", help="answer requests with JSON, not SSE")
    args = p.parse_args()

    import uvicorn

    tls = {"ssl_certfile": args.cert, "ssl_keyfile": args.key} if args.cert else {}
    uvicorn.run(build_app(args), host=HOST, port=args.port, log_level="warning", **tls)


if __name__ == "__main__":
    sys.exit(main())
