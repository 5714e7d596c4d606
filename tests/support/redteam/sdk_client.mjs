// The official TypeScript MCP client (npm @modelcontextprotocol/sdk), unmodified, reporting all it got.
//
//   node sdk_client.mjs --url URL [--tool leak] [--timeout 3]
//   node sdk_client.mjs --url-template TEMPLATE --framings a,b,c [--tool leak] [--timeout 3]
//
// Run with NODE_PATH pointing at the node_modules that holds the SDK; trust a test CA with
// NODE_EXTRA_CA_CERTS=ca.pem. One session connects over streamable HTTP, lists the tools, calls
// --tool with no arguments and closes. With --url there is one session and one JSON line, the
// same shape as sdk_client.py:
//
//   {"ok": bool, "result": {...}, "error": string | null}
//
// With --url-template (which holds `{framing}`) and --framings, there is one fresh Client per
// framing, run one after the other in this process, each at TEMPLATE with `{framing}` replaced by
// the name, and one JSON line per framing, in the order given, with "framing": NAME first.
//
// `result` holds everything the SDK handed to the application: "tools" (the listTools result),
// "call" (the callTool result), "messages" (every notification given to the fallback notification
// handler, every error reported through onerror - unparseable messages, stray responses, failed
// streams - and any unhandled rejection or uncaught exception while the session ran) and "logging"
// (every notifications/message given to its handler). `error` is the full text of what connect,
// listTools or callTool threw: name, message, code, data, and the chain of causes. --timeout
// bounds a session (connect, list, call) in seconds; each request may wait a third of it. A
// session that outlives its timeout is reported with a TimeoutError and closed; the next one starts
// regardless.
import { createRequire } from "node:module";
import path from "node:path";
import { parseArgs } from "node:util";

const require = createRequire(path.join(process.env.NODE_PATH || ".", "x.js"));
const { Client } = require("@modelcontextprotocol/sdk/client/index.js");
const { StreamableHTTPClientTransport } = require("@modelcontextprotocol/sdk/client/streamableHttp.js");
const { LoggingMessageNotificationSchema } = require("@modelcontextprotocol/sdk/types.js");

const CLOSE_GRACE_MS = 500; // how long close() may take before the session is left behind

const usage = "usage: sdk_client.mjs (--url URL | --url-template TEMPLATE --framings a,b,c) [--tool NAME] [--timeout SECONDS]";
const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    "url-template": { type: "string" },
    framings: { type: "string" },
    tool: { type: "string", default: "leak" },
    timeout: { type: "string", default: "3" },
  },
});
const template = args["url-template"];
const timeoutMs = Number(args.timeout) * 1000;
const valid = args.url
  ? template === undefined && args.framings === undefined
  : template?.includes("{framing}") && Boolean(args.framings);
if (!valid || !(timeoutMs > 0)) {
  console.error(usage);
  process.exit(2);
}

/** JSON text of `value`, or its String() when it has none (undefined, cycles, BigInt). */
function json(value) {
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

/** Error text in full: name, message, code, data, sub-errors and the chain of causes. */
function describe(e, depth = 0) {
  if (!(e instanceof Error)) return typeof e === "string" ? e : json(e);
  let text = `${e.name}: ${e.message}`;
  if (e.code !== undefined) text += ` (code ${json(e.code)})`;
  if (e.data !== undefined) text += ` ${json(e.data)}`;
  if (depth < 8) {
    for (const sub of e.errors ?? []) text += ` [${describe(sub, depth + 1)}]`;
    if (e.cause !== undefined) text += ` (from ${describe(e.cause, depth + 1)})`;
  }
  return text;
}

let current = null; // the report of the session running now
const stray = (e) => current?.result.messages.push(`unhandled: ${describe(e)}`);
process.on("unhandledRejection", stray);
process.on("uncaughtException", stray);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** One session against `url`; its report, once it ended or timed out. */
async function runOne(url) {
  const out = { ok: false, result: { tools: null, call: null, messages: [], logging: [] }, error: null };
  current = out;
  const client = new Client({ name: "airlock-redteam", version: "1.0.0" });
  client.fallbackNotificationHandler = async (notification) => out.result.messages.push(notification);
  client.setNotificationHandler(LoggingMessageNotificationSchema, async (notification) => out.result.logging.push(notification));
  client.onerror = (e) => out.result.messages.push(describe(e));
  const options = { timeout: timeoutMs / 3 };
  const work = (async () => {
    await client.connect(new StreamableHTTPClientTransport(new URL(url)), options);
    out.result.tools = await client.listTools(undefined, options);
    out.result.call = await client.callTool({ name: args.tool, arguments: {} }, undefined, options);
    out.ok = true;
  })().then(
    () => "done",
    (e) => {
      out.error = out.error === null ? describe(e) : `${out.error}; then ${describe(e)}`;
      return "done";
    },
  );
  let timer;
  const expired = new Promise((resolve) => (timer = setTimeout(resolve, timeoutMs, "timeout")));
  if ((await Promise.race([work, expired])) === "timeout") {
    out.error = `TimeoutError: the session did not finish within ${args.timeout} s`;
  }
  clearTimeout(timer);
  const closed = client.close().catch((e) => out.result.messages.push(`close: ${describe(e)}`));
  await Promise.race([closed, sleep(CLOSE_GRACE_MS)]);
  return JSON.stringify(out); // a snapshot: a session left behind may still add to `out`
}

const sessions = args.url ? [[null, args.url]] : args.framings.split(",").map((f) => [f, template.replaceAll("{framing}", f)]);
for (const [framing, url] of sessions) {
  const report = await runOne(url);
  console.log(framing === null ? report : JSON.stringify({ framing, ...JSON.parse(report) }));
}
process.exit(0);
