/**
 * The layering ARCHITECTURE.md promises, checked on the source itself: libc is bound once, the
 * layers below `daemon/` never import it (nor the tests or the benchmarks), and `UsageError` has
 * one home. A change that breaks one of these fails here, naming the file.
 */

import assert from "node:assert/strict";
import { dirname, join, normalize, relative } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = normalize(join(dirname(fileURLToPath(import.meta.url)), ".."));
/** Folders below `daemon/`, lowest first (ARCHITECTURE.md's table). */
const LOWER = ["sys", "log", "ring", "vhost-user", "devices"];
/** Folders nothing in {@link LOWER} may import. */
const HIGHER = ["daemon", "tests", "bench", "examples"];

/** Every TypeScript file of the project, as a path relative to its root. */
function sources(dir = ROOT): string[] {
  const out: string[] = [];
  for (const entry of Deno.readDirSync(dir)) {
    if (entry.name.startsWith(".") || entry.name === "node_modules") continue;
    const path = join(dir, entry.name);
    if (entry.isDirectory) out.push(...sources(path));
    else if (entry.isFile && entry.name.endsWith(".ts")) out.push(relative(ROOT, path));
  }
  return out;
}

/** The project files a file imports or re-exports by a relative specifier (roots-relative). */
function relativeImports(file: string, text: string): string[] {
  const found: string[] = [];
  for (const m of text.matchAll(/(?:\bfrom|\bimport\(?)\s*["'](\.{1,2}\/[^"']+)["']/g)) {
    found.push(relative(ROOT, normalize(join(ROOT, dirname(file), m[1]))));
  }
  return found;
}

const files = sources().map((path) => ({
  path,
  text: Deno.readTextFileSync(join(ROOT, path)),
}));

Deno.test("layers: sys/libc.ts is the only binding of libc", () => {
  // Built from parts so that this file does not name the call itself.
  const call = ["Deno", "dlopen("].join(".");
  const opening = files.filter((f) => f.text.includes(call)).map((f) => f.path);
  assert.deepEqual(opening, ["sys/libc.ts"]);
});

Deno.test("layers: nothing below daemon/ imports daemon/, tests/, bench/ or examples/", () => {
  const leaks = files
    .filter((f) => LOWER.includes(f.path.split("/")[0]) && !f.path.endsWith("_test.ts"))
    .flatMap((f) =>
      relativeImports(f.path, f.text)
        .filter((target) => HIGHER.includes(target.split("/")[0]))
        .map((target) => `${f.path} -> ${target}`)
    );
  assert.deepEqual(leaks, []);
});

Deno.test("layers: tests next to lower layers import no daemon/ either", () => {
  const leaks = files
    .filter((f) => LOWER.includes(f.path.split("/")[0]) && f.path.endsWith("_test.ts"))
    .flatMap((f) =>
      relativeImports(f.path, f.text)
        .filter((target) => target.startsWith("daemon/"))
        .map((target) => `${f.path} -> ${target}`)
    );
  assert.deepEqual(leaks, []);
});

Deno.test("layers: UsageError is declared once, in sys/errors.ts, and imported from there", () => {
  const declaring = files.filter((f) => /\bclass UsageError\b/.test(f.text)).map((f) => f.path);
  assert.deepEqual(declaring, ["sys/errors.ts"]);
  const elsewhere = files.filter((f) =>
    /import\s*\{[^}]*\bUsageError\b[^}]*\}\s*from\s*["']([^"']+)["']/.test(f.text) &&
    relativeImports(f.path, f.text).every((t) => t !== "sys/errors.ts")
  ).map((f) => f.path);
  assert.deepEqual(elsewhere, []);
});
