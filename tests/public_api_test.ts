/**
 * The public API: what `mod.ts` (the package's one export) offers, and what it keeps to itself.
 * Imports nothing of vhostd but `mod.ts`, as a user of the package would (and the test helper
 * that runs a device written that way).
 *
 * @module
 */

import assert from "node:assert/strict";
import * as vhostd from "../mod.ts";
import type { DescriptorChain, Virtqueue } from "../mod.ts";
import { daemonFile, DaemonProcess, withDir } from "./helpers/daemon.ts";

/** Every value `mod.ts` exports; types are checked by the compiler below. */
const PUBLIC_VALUES = [
  "IoDirection",
  "IoVec",
  "blockMetrics",
  "createBlkDevice",
  "createConsoleDevice",
  "createNetTapDevice",
  "defineCounters",
  "frontend",
  "getLogger",
  "serveDevice",
];

Deno.test("mod.ts exports the device contract, serving, logging, the devices and the front-end", () => {
  assert.deepEqual(Object.keys(vhostd).sort(), PUBLIC_VALUES);
  for (const name of ["BlkFrontend", "FrontendConnection", "GuestRam", "NetDriver"]) {
    assert.equal(typeof (vhostd.frontend as Record<string, unknown>)[name], "function", name);
  }
  assert.equal(vhostd.frontend.Request.GET_FEATURES, 1);
  assert.equal(vhostd.frontend.ProtocolFeature.CONFIG, 9);
});

Deno.test("mod.ts keeps the queue, the protocol state machines and test helpers to itself", () => {
  const exported = new Set([...Object.keys(vhostd), ...Object.keys(vhostd.frontend)]);
  for (
    const internal of [
      "SplitQueue",
      "DescriptorChain",
      "ParsedChain",
      "GuestMemory",
      "MemoryRegion",
      "InflightRegion",
      "DirtyLog",
      "VhostUserBackend",
      "VhostUserServer",
      "runServices",
      "vhostUser",
      "MESSAGE_HEADER_SIZE",
      "hasBlkFeature",
      "QueueError",
    ]
  ) {
    assert.ok(!exported.has(internal), `${internal} is exported`);
  }
});

Deno.test("a device sees a popped chain read-only", () => {
  // Compiled, never run: the test fails to type-check if a device could change a chain.
  const misuse = (queue: Virtqueue) => {
    const chain: DescriptorChain | null = queue.pop();
    if (chain === null) return;
    // @ts-expect-error segments are added only by the queue, which bounds-checks them
    chain.addSegment(chain.region[0]!, 0, 1 << 30, true);
    // @ts-expect-error a segment's host address is the queue's to set
    chain.address[0] = 0;
    // @ts-expect-error so is its length
    chain.length[0] = 1 << 30;
    // @ts-expect-error and the chain's counts
    chain.segmentCount = 1024;
  };
  assert.equal(typeof misuse, "function");
});

Deno.test("deno doc shows the numbers of the protocol's named constants", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["doc", "--json", new URL("../vhost-user/frontend/mod.ts", import.meta.url).pathname],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  assert.equal(out.code, 0);
  // deno doc's JSON: per module, symbols; a constant's type literal lists each member's type,
  // which is `number` (no value shown) unless the member's own initializer is a literal type.
  type Member = { name: string; tsType: { kind: string; repr: string } };
  type Symbol = {
    name: string;
    declarations: { def?: { tsType?: { value?: { properties?: Member[] } } } }[];
  };
  const json = JSON.parse(new TextDecoder().decode(out.stdout));
  const symbols: Symbol[] = Object.values(json.nodes as Record<string, { symbols: Symbol[] }>)
    .flatMap((m) => m.symbols);
  const members = (name: string) =>
    new Map(
      (symbols.find((s) => s.name === name)?.declarations[0].def?.tsType?.value?.properties ?? [])
        .map((m) => [m.name, m.tsType]),
    );
  for (const name of ["Request", "BackendRequest", "Flags", "ProtocolFeature", "VirtioFeature"]) {
    const shown = members(name);
    const actual = (vhostd.frontend as unknown as Record<string, Record<string, number>>)[name];
    assert.equal(shown.size, Object.keys(actual).length, name);
    for (const [member, value] of Object.entries(actual)) {
      assert.equal(shown.get(member)?.repr, String(value), `${name}.${member}`);
    }
  }
});

Deno.test("the rng example is written against mod.ts alone", async () => {
  const source = await Deno.readTextFile(new URL("../examples/rng/main.ts", import.meta.url));
  const imports = [...source.matchAll(/^import .* from "([^"]+)";$/gm)].map((m) => m[1]);
  assert.deepEqual(imports.filter((i) => !i.startsWith("node:")), ["../../mod.ts"]);
});

Deno.test("a device logs through mod.ts's getLogger in vhostd's format", async () => {
  await withDir("vhostd-api-", async (dir) => {
    const d = DaemonProcess.spawn(
      [`${dir}/dev.sock`],
      undefined,
      false,
      daemonFile("tests/helpers/logging_device.ts"),
    );
    try {
      // The device is built in the data-plane worker, which set up logging as serveDevice asked.
      await d.waitFor(
        () => d.stderr.includes("hello from a device"),
        60_000,
        "the device's record",
      );
      const line = d.stderr.split("\n").find((l) => l.includes("hello from a device"))!;
      const record = JSON.parse(line);
      assert.equal(record.logger, "vhostd.logging-device");
      assert.equal(record.level, "WARNING");
      assert.equal(record.message, "built: hello from a device");
      assert.equal(record.properties.greeting, "hello from a device");
    } finally {
      assert.equal(await d.stop(), 0);
    }
  });
});
