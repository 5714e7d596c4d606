// The official TypeScript SDK's client (npm @modelcontextprotocol/sdk), unmodified, doing
// the same calls as mcp_peer.py's client and printing the same JSON shape.
//
//   node mcp_client.mjs URL streamable|legacy
//
// With HTTPS_PROXY set it goes through that proxy (undici's EnvHttpProxyAgent).
// Run with NODE_PATH pointing at the node_modules that holds the SDK.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");
const { SSEClientTransport } = require("@modelcontextprotocol/sdk/client/sse.js");
const { CallToolResultSchema } = require("@modelcontextprotocol/sdk/types.js");

// Behind an HTTP proxy, as applications do it: Node's fetch ignores HTTPS_PROXY; undici's
// EnvHttpProxyAgent honours HTTPS_PROXY, HTTP_PROXY and NO_PROXY (either case).
if (process.env.HTTPS_PROXY || process.env.https_proxy) {
  const { EnvHttpProxyAgent, setGlobalDispatcher } = require("undici");
  setGlobalDispatcher(new EnvHttpProxyAgent());
}

const [url, kind] = process.argv.slice(2);
const transport =
  kind === "legacy"
    ? new SSEClientTransport(new URL(url))
    : new StreamableHTTPClientTransport(new URL(url));
const client = new Client({ name: "airlock-test-node", version: "1.0.0" });
await client.connect(transport);

const seen = { progress: [], calls: {}, errors: {} };
const texts = (r) => r.content.filter((c) => c.type === "text").map((c) => c.text);
seen.tools = (await client.listTools()).tools.map((t) => t.name).sort();
for (const [name, args] of [
  ["add", { a: 2, b: 40 }],
  ["echo", { text: "héllo wörld ".repeat(3) }],
  ["contact", {}],
]) {
  seen.calls[name] = texts(await client.callTool({ name, arguments: args }));
}
const countdown = await client.callTool({ name: "countdown", arguments: { steps: 3 } }, CallToolResultSchema, {
  onprogress: (p) => seen.progress.push([p.progress, p.total ?? null, p.message ?? null]),
});
seen.calls.countdown = texts(countdown);
try {
  const r = await client.callTool({ name: "delete_everything", arguments: {} });
  seen.calls.delete_everything = texts(r);
} catch (e) {
  seen.errors.delete_everything = { code: e.code ?? null, message: String(e.message) };
}
seen.calls.add_after = texts(await client.callTool({ name: "add", arguments: { a: 1, b: 1 } }));
if (kind !== "legacy" && transport.terminateSession) {
  await transport.terminateSession(); // DELETE
}
await client.close();
console.log(JSON.stringify(seen));
