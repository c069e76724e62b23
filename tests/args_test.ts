/**
 * daemon/args.ts, the command line parser of every command: what it accepts, the one clear error
 * for everything else, and that the daemon's modules use it instead of `node:util`.
 */

import assert from "node:assert/strict";
import { parseArgs } from "../daemon/args.ts";
import { UsageError } from "../sys/errors.ts";

const options = {
  socket: { type: "string" },
  queues: { type: "string" },
  json: { type: "boolean" },
  help: { type: "boolean", short: "h" },
  "allow-uid": { type: "string", multiple: true },
} as const;

Deno.test("parseArgs: separate and attached values, booleans, short forms, repeats", () => {
  const { values, positionals } = parseArgs({
    args: ["--socket", "/s", "--queues=4", "--json", "-h", "--allow-uid", "1", "--allow-uid=-2"],
    options,
  });
  assert.deepEqual({ ...values }, {
    socket: "/s",
    queues: "4",
    json: true,
    help: true,
    "allow-uid": ["1", "-2"],
  });
  assert.deepEqual(positionals, []);
  assert.equal(parseArgs({ args: ["--queues", "1", "--queues", "2"], options }).values.queues, "2");
  assert.equal(parseArgs({ args: ["--socket="], options }).values.socket, "");
});

Deno.test("parseArgs: every mistake is one UsageError naming it", () => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /^Unknown option '--bogus'$/],
    [["--bogus=1"], /^Unknown option '--bogus'$/],
    [["-x"], /^Unknown option '-x'$/],
    [["-hh"], /^Unknown option '-hh'$/],
    [["--__proto__"], /^Unknown option '--__proto__'$/],
    [["--toString"], /^Unknown option '--toString'$/],
    [["--socket"], /^Option '--socket <value>' argument missing$/],
    [["--socket", "--json"], /argument is ambiguous.*'--socket=--json'/],
    [["--json=yes"], /^Option '--json' does not take an argument$/],
    [["stray"], /^Unexpected argument 'stray'/],
    [["--", "--json"], /^Unexpected argument '--json'/],
  ];
  for (const [args, message] of cases) {
    assert.throws(() => parseArgs({ args, options }), (e: Error) => {
      assert.ok(e instanceof UsageError, `${args.join(" ")}: ${e}`);
      assert.match(e.message, message, args.join(" "));
      return true;
    });
  }
});

Deno.test("parseArgs: positionals when allowed, everything after -- taken as it is", () => {
  const { values, positionals } = parseArgs({
    args: ["a", "--json", "-", "--", "--socket", "b"],
    options,
    allowPositionals: true,
  });
  assert.deepEqual({ ...values }, { json: true });
  assert.deepEqual(positionals, ["a", "-", "--socket", "b"]);
});

Deno.test("no daemon module imports node:util (its compatibility layer costs ~1.2 MiB RSS)", () => {
  const dir = new URL("../daemon/", import.meta.url);
  for (const entry of Deno.readDirSync(dir)) {
    if (!entry.name.endsWith(".ts")) continue;
    const text = Deno.readTextFileSync(new URL(entry.name, dir));
    assert.doesNotMatch(text, /^import [^;]*from "node:util";/m, `daemon/${entry.name}`);
  }
});
