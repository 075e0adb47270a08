// The committed src/openapi.ts is what openapi-typescript makes of the document a running `ferry dev` serves.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { generate } from "../scripts/openapi-gen-lib.mjs";
import { startDev } from "./support.mjs";

test("src/openapi.ts matches GET /v1/openapi.json of ferry dev", async () => {
  const dev = await startDev();
  try {
    const doc = await (await fetch(`${dev.url}/v1/openapi.json`)).json();
    const fresh = await generate(doc);
    const committed = await readFile(new URL("../src/openapi.ts", import.meta.url), "utf8");
    assert.ok(
      fresh === committed,
      "src/openapi.ts is stale: run `npm run gen` in clients/typescript (or node scripts/gen-openapi.mjs URL) and commit it",
    );
  } finally {
    dev.kill();
  }
});
