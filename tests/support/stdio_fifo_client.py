"""A hostile client for the stdio tests: it starts a stdio MCP server whose stdin and stdout
are *named* FIFOs (not pipes made by the client's spawn), then speaks JSON-RPC to it by hand and
prints each answer line. Standard library only.

  stdio_fifo_client.py DIR PYTHON SERVER_SCRIPT MARKER
"""

import json
import os
import subprocess
import sys

d, python, script, marker = sys.argv[1:5]
a, b = os.path.join(d, "to-server"), os.path.join(d, "from-server")
os.mkfifo(a)
os.mkfifo(b)
# Opened read-write so that neither open blocks before the other side exists.
server_in = os.open(a, os.O_RDWR)
server_out = os.open(b, os.O_RDWR)
proc = subprocess.Popen(
    [python, script, "server", "--marker", marker], stdin=server_in, stdout=server_out
)
to_server = open(a, "w")
from_server = open(b, "r")


def send(msg):
    to_server.write(json.dumps(msg) + "\n")
    to_server.flush()


send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
      "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                 "clientInfo": {"name": "fifo", "version": "1"}}})
print(from_server.readline().strip(), flush=True)
send({"jsonrpc": "2.0", "method": "notifications/initialized"})
send({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
      "params": {"name": "drop_table", "arguments": {"name": "users"}}})
print(from_server.readline().strip(), flush=True)
proc.kill()
