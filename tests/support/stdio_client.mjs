// The official TypeScript SDK's stdio client (npm @modelcontextprotocol/sdk), unmodified,
// spawning `npx -y @modelcontextprotocol/server-everything` (in the directory that has it
// installed, so npx needs no network) and printing what it saw as one JSON object.
//
//   node stdio_client.mjs NODE_MODULES_PARENT [BLOCKED_TOOL]
//
// StdioClientTransport passes the server only a few environment variables (HOME, PATH, ...).
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StdioClientTransport } = require("@modelcontextprotocol/sdk/client/stdio.js");

const [cwd, blocked] = process.argv.slice(2);
const transport = new StdioClientTransport({
  command: "npx",
  args: ["-y", "@modelcontextprotocol/server-everything"],
  cwd,
  stderr: "ignore",
});
const client = new Client({ name: "airlock-test-node-stdio", version: "1.0.0" });
await client.connect(transport);
const seen = { calls: {}, errors: {} };
seen.tools = (await client.listTools()).tools.map((t) => t.name).sort();
const texts = (r) => r.content.filter((c) => c.type === "text").map((c) => c.text);
seen.calls.echo = texts(await client.callTool({ name: "echo", arguments: { message: "mail alice@example.com" } }));
if (blocked) {
  try {
    seen.calls[blocked] = texts(await client.callTool({ name: blocked, arguments: {} }));
  } catch (e) {
    seen.errors[blocked] = { code: e.code, message: e.message };
  }
}
seen.calls.echo_after = texts(await client.callTool({ name: "echo", arguments: { message: "still here" } }));
await client.close();
console.log(JSON.stringify(seen));
