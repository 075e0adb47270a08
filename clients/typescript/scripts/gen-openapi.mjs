// Regenerates src/openapi.ts from the gateway's OpenAPI document.
//   node scripts/gen-openapi.mjs [URL-or-file]
// Default: the document in the gateway's sources (the same bytes `GET /v1/openapi.json` serves).
// The test test/openapi.test.mjs regenerates from a running `ferry dev` and compares.
import { readFile, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import { generate } from "./openapi-gen-lib.mjs";

const here = fileURLToPath(new URL(".", import.meta.url));
const source = process.argv[2] ?? `${here}../../../crates/gateway/src/http/openapi.json`;
const doc = /^https?:/.test(source)
  ? await (await fetch(source)).json()
  : JSON.parse(await readFile(source, "utf8"));
await writeFile(`${here}../src/openapi.ts`, await generate(doc));
console.log(`src/openapi.ts regenerated from ${source}`);
