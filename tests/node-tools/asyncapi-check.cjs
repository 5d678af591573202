// Parse an AsyncAPI document with the official parser (@asyncapi/parser) and print its
// diagnostics as JSON: [{severity, code, message, path}]. Severity 0 is an error.
// Usage: NODE_PATH=.cache/node-tools/node_modules node asyncapi-check.cjs docs/asyncapi.yaml
"use strict";
const fs = require("fs");
const { Parser } = require("@asyncapi/parser");

async function main() {
  const text = fs.readFileSync(process.argv[2], "utf8");
  const { diagnostics } = await new Parser().parse(text);
  const out = diagnostics.map((d) => ({
    severity: d.severity,
    code: String(d.code),
    message: d.message,
    path: d.path.join("."),
  }));
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(2);
});
