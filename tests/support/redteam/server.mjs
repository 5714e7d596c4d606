// A real TypeScript-SDK MCP server (npm @modelcontextprotocol/sdk: McpServer +
// StreamableHTTPServerTransport behind the SDK's createMcpExpressApp, as its
// simpleStreamableHttp example deploys it) that red-team requests try to trick.
//
//   node server.mjs --port P [--cert C --key K] --marker FILE
//                   [--hostname mcp.internal.test] [--json-response]
//
// Run with NODE_PATH pointing at the node_modules that holds the SDK. Binds 127.0.0.1 only,
// speaks TLS (node:https) when --cert is given, and offers the same two tools as servers.py:
//   safe(text)       returns text
//   dangerous(text)  appends {"sdk": "ts", "text": text} as one JSON line to --marker, returns "ran"
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import { createRequire } from "node:module";
import path from "node:path";
import { parseArgs } from "node:util";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { McpServer } = require("@modelcontextprotocol/sdk/server/mcp.js");
const { StreamableHTTPServerTransport } = require("@modelcontextprotocol/sdk/server/streamableHttp.js");
const { createMcpExpressApp } = require("@modelcontextprotocol/sdk/server/express.js");
const { isInitializeRequest } = require("@modelcontextprotocol/sdk/types.js");
const { z } = require("zod");

const { values: args } = parseArgs({
  options: {
    port: { type: "string" },
    cert: { type: "string" },
    key: { type: "string" },
    marker: { type: "string" },
    hostname: { type: "string", default: "mcp.internal.test" },
    "json-response": { type: "boolean", default: false },
  },
});
if (!args.port || !args.marker) {
  console.error("usage: server.mjs --port P [--cert C --key K] --marker FILE [--hostname H] [--json-response]");
  process.exit(2);
}

function newServer() {
  const server = new McpServer({ name: "redteam-ts", version: "1.0.0" });
  server.registerTool(
    "safe",
    { description: "Return the text unchanged.", inputSchema: { text: z.string() } },
    async ({ text }) => ({ content: [{ type: "text", text }] }),
  );
  server.registerTool(
    "dangerous",
    { description: "A tool the policy blocks: record that it ran.", inputSchema: { text: z.string() } },
    async ({ text }) => {
      fs.appendFileSync(args.marker, JSON.stringify({ sdk: "ts", text }) + "\n");
      return { content: [{ type: "text", text: "ran" }] };
    },
  );
  return server;
}

const app = createMcpExpressApp({ host: "127.0.0.1", allowedHosts: [args.hostname, "127.0.0.1", "localhost"] });
const transports = new Map();
const rpcError = (res, status, code, message) =>
  res.status(status).json({ jsonrpc: "2.0", error: { code, message }, id: null });

app.post("/mcp", async (req, res) => {
  const sessionId = req.headers["mcp-session-id"];
  let transport = sessionId ? transports.get(sessionId) : undefined;
  if (!transport) {
    if (sessionId) return rpcError(res, 404, -32001, "Session not found");
    if (!isInitializeRequest(req.body)) return rpcError(res, 400, -32000, "Bad Request: No valid session ID provided");
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      enableJsonResponse: args["json-response"],
      onsessioninitialized: (id) => transports.set(id, transport),
    });
    transport.onclose = () => transports.delete(transport.sessionId);
    await newServer().connect(transport);
  }
  await transport.handleRequest(req, res, req.body);
});

const sessionRequest = async (req, res) => {
  const transport = transports.get(req.headers["mcp-session-id"]);
  if (!transport) return rpcError(res, 400, -32000, "Invalid or missing session ID");
  await transport.handleRequest(req, res);
};
app.get("/mcp", sessionRequest);
app.delete("/mcp", sessionRequest);

const listener = args.cert
  ? https.createServer({ cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key) }, app)
  : http.createServer(app);
listener.listen(Number(args.port), "127.0.0.1");
