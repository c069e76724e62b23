/**
 * The "write your own device" example (examples/rng) against a real QEMU 7.2 guest, attached with
 * QEMU's stock `vhost-user-rng-pci`, and its dirty logging through the project's front-end
 * (QEMU 7.2 marks vhost-user-rng unmigratable, so no real migration can show it).
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";
import {
  DriverQueue,
  FrontendConnection,
  FrontendDirtyLog,
  GuestRam,
  LOG_PAGE,
} from "../vhost-user/frontend/mod.ts";
import { bit, ProtocolFeature, VirtioFeature, VRING_F_LOG } from "../vhost-user/message.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";

const RNG = new URL("../examples/rng/main.ts", import.meta.url).pathname;

Deno.test("guest: the rng example feeds /dev/hwrng through vhost-user-rng-pci", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-rng-" });
  const sock = `${dir}/rng.sock`;
  const d = await DaemonProcess.start(["--socket", sock], undefined, false, RNG);
  try {
    const r = await runGuest({
      extraArgs: [
        "-chardev",
        `socket,id=rng0,path=${sock}`,
        "-device",
        "vhost-user-rng-pci,chardev=rng0",
      ],
      script: `
echo "RESULT current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/r bs=256 count=16 2>/dev/null
echo "RESULT bytes=$(wc -c < /tmp/r)"
echo "RESULT distinct=$(od -An -v -tx1 /tmp/r | tr ' ' '\\n' | grep . | sort -u | wc -l)"
`,
    });
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    assert.match(res.current ?? "", /^virtio_rng/, describeGuestRun(r));
    assert.equal(res.bytes, "4096", describeGuestRun(r));
    assert.ok(
      Number(res.distinct) > 200,
      `4 KiB of random bytes use most byte values: ${res.distinct}`,
    );
  } finally {
    assert.equal(await d.stop(), 0, d.stderr);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the rng example logs every page it fills while a migration runs, with no code of its own", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-rnglog-" });
  const sock = `${dir}/rng.sock`;
  const d = await DaemonProcess.start(["--socket", sock], undefined, false, RNG);
  const conn = await FrontendConnection.connect(sock, { retryMs: 5000 });
  const ram = GuestRam.create();
  let log: FrontendDirtyLog | null = null;
  try {
    const offered = conn.getFeatures();
    assert.notEqual(offered & bit(VirtioFeature.LOG_ALL), 0n, "VHOST_F_LOG_ALL offered");
    const pf = conn.getProtocolFeatures();
    assert.notEqual(pf & bit(ProtocolFeature.LOG_SHMFD), 0n, "LOG_SHMFD offered");
    conn.setProtocolFeatures(
      pf & (bit(ProtocolFeature.LOG_SHMFD) | bit(ProtocolFeature.REPLY_ACK)),
    );
    conn.setOwner();
    const features = offered &
      (bit(VirtioFeature.VERSION_1) | bit(VirtioFeature.PROTOCOL_FEATURES));
    conn.setFeatures(features);
    conn.setMemTable([...ram.regions], ram.fds);
    const q = DriverQueue.create(ram, 0, 16);
    conn.setVringNum(0, 16);
    conn.setVringBase(0, 0);
    conn.setVringAddr(q.vringAddr());
    conn.setVringCall(0, q.layout.callFd);
    conn.setVringKick(0, q.layout.kickFd);
    conn.setVringEnable(0, true);
    const fill = (pages: number) => {
      const b = ram.alloc(pages * LOG_PAGE, LOG_PAGE);
      const head = q.add([{ gpa: b.gpa, length: b.length, writable: true }]);
      q.publish();
      q.kick();
      assert.equal(q.waitUsed(5000), head);
      assert.equal(q.lastLen, b.length);
      return b;
    };
    // Not migrating: nothing to log (and no log to write to).
    fill(1);
    // QEMU 7.2's order when a migration starts: the log, LOG_ALL, then the rings' log flag.
    log = new FrontendDirtyLog(Math.max(...ram.regions.map((r) => r.guestPhysAddr + r.memorySize)));
    conn.setLogBase(log.fd, log.size);
    conn.setFeatures(features | bit(VirtioFeature.LOG_ALL));
    conn.setVringAddr({ ...q.vringAddr(), flags: VRING_F_LOG });
    conn.sync();
    log.sync();
    const b = fill(3);
    const dirty = new Set(log.sync());
    for (let p = 0; p < 3; p++) assert.ok(dirty.has(b.gpa + p * LOG_PAGE), `filled page ${p}`);
    const usedPage = Math.floor(q.layout.used.gpa / LOG_PAGE) * LOG_PAGE;
    assert.ok(dirty.has(usedPage), "the used ring's page");
    // Nothing else: the log names what the device wrote, not all of RAM.
    assert.ok(dirty.size <= 5, `${dirty.size} pages marked`);
  } finally {
    conn.close();
    ram.close();
    log?.close();
    assert.equal(await d.stop(), 0, d.stderr);
    await Deno.remove(dir, { recursive: true });
  }
});
