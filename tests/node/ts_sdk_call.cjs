// A client built on the TypeScript MCP SDK 1.x, as most Node MCP clients are: it connects to a server
// over stdio, lists the tools (which makes the SDK validate each result against its outputSchema) and
// calls one tool with the SDK's default request options (a 60 s timeout, not reset by progress).
//
// node ts_sdk_call.cjs <npm prefix> <tool> <arguments as JSON> <server command> [server args...]
//
// Prints one JSON line: the SDK's version and default timeout, the tool names, and the call's result
// or the error it raised ({code, message}). The server gets this process's environment and directory.
"use strict";
const { createRequire } = require("node:module");
const path = require("node:path");

const [prefix, tool, args, command, ...commandArgs] = process.argv.slice(2);
const load = createRequire(path.resolve(prefix, "loader.js"));  // resolves in <prefix>/node_modules
const { Client } = load("@modelcontextprotocol/sdk/client/index.js");
const { StdioClientTransport } = load("@modelcontextprotocol/sdk/client/stdio.js");
const { DEFAULT_REQUEST_TIMEOUT_MSEC } = load("@modelcontextprotocol/sdk/shared/protocol.js");
const manifest = path.resolve(prefix, "node_modules", "@modelcontextprotocol", "sdk", "package.json");
const { version } = JSON.parse(require("node:fs").readFileSync(manifest, "utf8"));

async function main() {
  const transport = new StdioClientTransport({ command, args: commandArgs, env: process.env, cwd: process.cwd() });
  const client = new Client({ name: "ts-sdk-call", version: "1.0.0" });
  await client.connect(transport);
  const out = { sdk: version, defaultTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MSEC };
  out.tools = (await client.listTools()).tools.map((t) => t.name);
  const started = Date.now();
  try {
    out.result = await client.callTool({ name: tool, arguments: JSON.parse(args) });
  } catch (error) {
    out.error = { code: error.code, message: String(error.message) };
  }
  out.elapsedMs = Date.now() - started;
  await client.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((error) => {
  process.stderr.write(String((error && error.stack) || error) + "\n");
  process.exit(1);
});
