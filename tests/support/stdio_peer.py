"""A real stdio MCP server and a real client that spawns it, on the unmodified Python SDK.

  stdio_peer.py server --marker FILE     (MCPServer over stdin/stdout)
  stdio_peer.py client --marker FILE [--mode legacy|auto] [--server-script COPY]

The client starts the server through `sh -c` (so the server is a grandchild, as with `npx`),
calls its tools and prints one JSON object: what it saw. The server appends every call that
reaches it to the marker file, so a test knows what was never forwarded.
"""

import argparse
import asyncio
import json
import os
import sys


def serve(args):
    if args.fastmcp:
        from fastmcp import FastMCP  # the standalone `fastmcp` package

        mcp = FastMCP("airlock-stdio-test-server")
    else:
        from mcp.server.mcpserver import MCPServer  # the SDK's own (FastMCP's successor)

        mcp = MCPServer("airlock-stdio-test-server")

    def mark(line):
        with open(args.marker, "a") as f:
            f.write(line + "\n")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text unchanged."""
        mark("echo " + text)
        return text

    @mcp.tool()
    def big(n: int) -> str:
        """Return n bytes of text."""
        mark(f"big {n}")
        return "x" * n

    @mcp.tool()
    def drop_table(name: str) -> str:
        """Drop a table (a policy blocks this one)."""
        mark("DROP REACHED " + name)
        return "dropped"

    if args.fastmcp:
        mcp.run(show_banner=False)
    else:
        mcp.run("stdio")


async def run_client(args):
    from mcp import Client, StdioServerParameters

    script = args.server_script or os.path.abspath(__file__)
    python = args.server_python or sys.executable
    flag = " --fastmcp" if args.server_python else ""
    server = StdioServerParameters(
        command="/bin/sh",
        args=["-c", f'"{python}" "{script}" server --marker "{args.marker}"{flag}'],
    )
    seen = {"calls": {}, "errors": {}}
    async with Client(server, mode=args.mode) as client:
        seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
        r = await client.call_tool("echo", {"text": "write to bob@example.com please"})
        seen["calls"]["echo"] = [c.text for c in r.content if hasattr(c, "text")]
        if args.pause_until:
            while not os.path.exists(args.pause_until):
                await asyncio.sleep(0.02)
        r = await client.call_tool("big", {"n": 1024 * 1024})
        seen["calls"]["big"] = sum(len(c.text) for c in r.content if hasattr(c, "text"))
        try:
            r = await client.call_tool("drop_table", {"name": "users"})
            seen["calls"]["drop_table"] = [c.text for c in r.content if hasattr(c, "text")]
        except Exception as e:  # MCPError for a JSON-RPC error answer
            code = getattr(getattr(e, "error", None), "code", None)
            seen["errors"]["drop_table"] = {"code": code, "message": str(e)}
        # The session goes on after a refused call.
        r = await client.call_tool("echo", {"text": "still here"})
        seen["calls"]["echo_after"] = [c.text for c in r.content if hasattr(c, "text")]
    print(json.dumps(seen, sort_keys=True))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--marker", required=True)
    s.add_argument("--fastmcp", action="store_true", help="serve with the `fastmcp` package")
    c = sub.add_parser("client")
    c.add_argument("--marker", required=True)
    c.add_argument("--mode", default="auto")
    c.add_argument("--server-script", help="a copy of this file to start as the server")
    c.add_argument("--pause-until", help="after the first call, wait until this file exists")
    c.add_argument("--server-python", help="run the server with this Python and `fastmcp`")
    args = p.parse_args()
    if args.role == "server":
        serve(args)
    else:
        asyncio.run(run_client(args))


if __name__ == "__main__":
    sys.exit(main())
