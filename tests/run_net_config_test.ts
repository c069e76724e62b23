/**
 * `vhostd run --config` with a net device next to a blk device: both served by one process, the
 * TAP created while it runs and gone after; a bad net field is one line and exit code 2.
 */

import assert from "node:assert/strict";
import { linkExists } from "./helpers/net.ts";
import { DaemonProcess, runVhostd, sparseFile } from "./helpers/daemon.ts";

const TAP = "vhdcfg0";

Deno.test("run: a config with blk and net devices serves both from one process", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-runnet-" });
  try {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const config = {
      name: "vmnet",
      socketDir: dir,
      devices: [
        { type: "blk", id: "disk", image: `${dir}/d.img` },
        { type: "net", id: "nic", tap: TAP },
      ],
    };
    Deno.writeTextFileSync(`${dir}/vm.json`, JSON.stringify(config));
    const d = await DaemonProcess.start(["run", "--config", `${dir}/vm.json`]);
    try {
      assert.ok(Deno.lstatSync(`${dir}/disk.sock`).isSocket);
      assert.ok(Deno.lstatSync(`${dir}/nic.sock`).isSocket);
      assert.ok(await linkExists(TAP), "the TAP exists while the daemon runs");
      assert.match(d.stdout, /-netdev vhost-user,id=nic,chardev=nicc,queues=1 /);
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
    assert.equal(await linkExists(TAP), false, "a TAP the daemon created goes away with it");

    config.devices[1] = { type: "net", id: "nic", tap: "bad/name" };
    Deno.writeTextFileSync(`${dir}/vm.json`, JSON.stringify(config));
    const r = await runVhostd(["run", "--config", `${dir}/vm.json`]);
    assert.equal(r.code, 2);
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    assert.match(r.stderr, /devices\[1\]\.tap: TAP name "bad\/name"/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
