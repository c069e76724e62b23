/**
 * `vhostd run --config`: the config is checked up front, and each mistake is one line that names
 * the field, with exit code 2 and nothing left behind.
 */

import assert from "node:assert/strict";
import { runVhostd, sparseFile } from "./helpers/daemon.ts";

const MiB = 1 << 20;

Deno.test("run --config: each mistake is one line naming the field, exit 2", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-config-" });
  try {
    sparseFile(`${dir}/a.img`, 8 * MiB);
    const good = { type: "blk", id: "a", image: `${dir}/a.img` };
    const cases: [string, unknown, RegExp][] = [
      [
        "missing image",
        { devices: [good, { type: "blk", id: "b", image: `${dir}/nope.img` }] },
        /^devices\[1\]\.image: file not found: .*nope\.img$/,
      ],
      [
        "misspelt field",
        { devices: [{ ...good, redOnly: true }] },
        /^devices\[0\]\.redOnly: unknown field \(did you mean "readOnly"\?\)$/,
      ],
      [
        "queues out of range",
        { devices: [{ ...good, queues: 0 }] },
        /^devices\[0\]\.queues: must be a whole number from 1 to 64, not 0$/,
      ],
      [
        "net poll window out of range",
        { devices: [{ type: "net", id: "n", tap: "vhxcfg0", pollUs: 5000 }] },
        /^devices\[0\]\.pollUs: must be a whole number from 0 to 1000, not 5000$/,
      ],
      [
        "unknown type",
        { devices: [good, { type: "nvme", id: "n" }] },
        /^devices\[1\]\.type: unknown device type "nvme" \(this build knows: .*blk.*\)$/,
      ],
      [
        "duplicate id",
        { devices: [good, { ...good, socket: "other.sock" }] },
        /^devices\[1\]\.id: "a" is also devices\[0\]'s id$/,
      ],
      [
        "shared socket",
        { devices: [good, { type: "blk", id: "b", image: `${dir}/a.img`, socket: "a.sock" }] },
        /^devices\[1\]\.socket: .*a\.sock is also devices\[0\]\.socket's socket$/,
      ],
      [
        "bad metrics address",
        { metrics: "localhost", devices: [good] },
        /^metrics: must be HOST:PORT like 127\.0\.0\.1:61910, not "localhost"$/,
      ],
      ["no devices", { devices: [] }, /^devices: must list at least one device$/],
      [
        "socket folder missing",
        { socketDir: `${dir}/missing`, devices: [good] },
        /^socketDir: directory not found: .*missing$/,
      ],
      [
        "wrong type of value",
        { devices: [{ ...good, readOnly: "yes" }] },
        /^devices\[0\]\.readOnly: must be true or false, not "yes"$/,
      ],
      ["not JSON", "{ devices: ", /: not valid JSON: /],
    ];
    const results = await Promise.all(cases.map(async ([name, config], i) => {
      const file = `${dir}/case${i}.json`;
      const body = typeof config === "string"
        ? config
        : JSON.stringify({ socketDir: dir, ...(config as object) });
      Deno.writeTextFileSync(file, body);
      return { name, ...(await runVhostd(["run", "--config", file])) };
    }));
    results.forEach((r, i) => {
      const lines = r.stderr.trimEnd().split("\n");
      assert.equal(r.code, 2, `${r.name}: exit code\n${r.stderr}`);
      assert.equal(lines.length, 1, `${r.name}: one line\n${r.stderr}`);
      const message = lines[0].replace(/^vhostd run: /, "");
      assert.match(message, cases[i][2], r.name);
      assert.equal(r.stdout, "", r.name);
    });
    // Nothing was left behind: no socket was created by any failing run.
    const left = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".sock"));
    assert.deepEqual(left, []);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("run --check accepts the example's shape and prints the QEMU arguments", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-config-" });
  try {
    const example = JSON.parse(
      Deno.readTextFileSync(new URL("../examples/config/vm1.json", import.meta.url)),
    );
    for (const d of example.devices) {
      if (d.image === undefined) continue;
      d.image = `${dir}/${d.image.split("/").pop()}`;
      sparseFile(d.image, 8 * MiB);
    }
    example.socketGroup = String(Deno.gid() ?? 0);
    Deno.writeTextFileSync(`${dir}/vm1.json`, JSON.stringify(example));
    const r = await runVhostd([
      "run",
      "--config",
      `${dir}/vm1.json`,
      "--socket-dir",
      dir,
      "--check",
    ]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^vm1: configuration OK/);
    assert.match(r.stdout, new RegExp(`-chardev socket,id=root,path=${dir}/root.sock,reconnect=1`));
    // Every device line names its queues: the root disk's 2, the default 16 for the data disk
    // (as `vhostd blk`), the NIC's 1 pair.
    assert.match(r.stdout, /-device vhost-user-blk-pci,chardev=root,num-queues=2 /);
    assert.match(r.stdout, /-device vhost-user-blk-pci,chardev=data,num-queues=16 /);
    assert.match(r.stdout, /-netdev vhost-user,id=net0,chardev=net0c,queues=1 /);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("every serving command documents --metrics and shows an example in --help", async () => {
  for (const cmd of ["run", "status", "blk", "start", "console"]) {
    const r = await runVhostd([cmd, "--help"]);
    assert.equal(r.code, 0, `${cmd}: ${r.stderr}`);
    assert.match(r.stdout, /Example:\n {2}(vhostd|deno task start) /, cmd);
    if (cmd !== "status") assert.match(r.stdout, /--metrics ADDR/, cmd);
  }
});
