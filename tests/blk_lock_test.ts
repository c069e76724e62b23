/**
 * Image locking: two writers never share an image by accident. A vhostd block device holds
 * QEMU's own byte locks on its image while it may write it, so a second vhostd and QEMU's own
 * `-drive` (with its default locking) are refused with one line naming the image and its holder;
 * `--no-locking` is the explicit opt-out. Real daemons, real QEMU 7.2, the project's front-end
 * playing the guest.
 */

import assert from "node:assert/strict";
import { BlkStatus } from "../devices/blk/mod.ts";
import { BlkFrontend } from "../vhost-user/frontend/mod.ts";
import { DaemonProcess, sparseFile, withDir } from "./helpers/daemon.ts";

const IMAGE_BYTES = 16 * 2 ** 20;

/** QEMU with the image as a plain `-drive` (default locking), as an operator's mistake would be. */
function qemuDrive(image: string): Deno.ChildProcess {
  return new Deno.Command("qemu-system-x86_64", {
    args: [
      "-machine",
      "q35",
      "-nodefaults",
      "-display",
      "none",
      "-S",
      "-drive",
      `if=none,id=d0,file=${image},format=raw`,
      // A drive takes its write lock when a device that writes it is attached.
      "-device",
      "virtio-blk-pci,drive=d0",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
}

/** Waits up to `ms` for QEMU to exit; returns its exit code and stderr, or null if it still runs. */
async function exitWithin(
  qemu: Deno.ChildProcess,
  ms: number,
): Promise<{ code: number; stderr: string } | null> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const out = await Promise.race([
    qemu.output().then((o) => ({ code: o.code, stderr: new TextDecoder().decode(o.stderr) })),
    new Promise<null>((r) => timer = setTimeout(() => r(null), ms)),
  ]);
  clearTimeout(timer);
  return out;
}

async function killQemu(qemu: Deno.ChildProcess): Promise<void> {
  try {
    qemu.kill("SIGKILL");
  } catch {
    // exited already
  }
  await qemu.output().catch(() => undefined);
}

/** Reads until a request succeeds (the lock is retried once a second), or gives up. */
async function readOkWithin(s: BlkFrontend, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  for (;;) {
    if (s.blk.read(0, 4096).status === BlkStatus.OK) return true;
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 200));
  }
}

Deno.test("image locking: a second vhostd and QEMU's -drive are refused while a device holds the image", async () => {
  await withDir("vhostd-lock-", async (dir) => {
    const image = `${dir}/disk.img`;
    sparseFile(image, IMAGE_BYTES);
    const args = (name: string) => ["blk", "--socket", `${dir}/${name}.sock`, "--image", image];
    const a = await DaemonProcess.start(args("a"));
    let b: DaemonProcess | null = null;
    const sessions: BlkFrontend[] = [];
    try {
      const first = await BlkFrontend.open({ socket: `${dir}/a.sock` });
      sessions.push(first);
      assert.equal(first.blk.write(0, new Uint8Array(4096).fill(7)).status, BlkStatus.OK);

      // QEMU's own disk on the image vhostd serves: QEMU refuses to start.
      const q = await exitWithin(qemuDrive(image), 60_000);
      assert.ok(q !== null, "QEMU started on an image vhostd writes");
      assert.notEqual(q.code, 0);
      assert.match(q.stderr, /Failed to get "write" lock/);

      // A second daemon starts (a migration's destination does), but its device, once started,
      // fails every request instead of writing beside the first; one line says who holds it.
      b = await DaemonProcess.start(args("b"));
      const second = await BlkFrontend.open({ socket: `${dir}/b.sock` });
      sessions.push(second);
      assert.equal(second.blk.write(8, new Uint8Array(4096).fill(9)).status, BlkStatus.IOERR);
      assert.equal(second.blk.read(0, 4096).status, BlkStatus.IOERR);
      const d = b;
      await d.waitFor(() => /requests fail until it is released/.test(d.stderr), 10_000, "refusal");
      const line = d.stderr.split("\n").find((l) => /requests fail until/.test(l)) ?? "";
      assert.ok(line.includes(image), `the line names the image: ${line}`);
      assert.match(line, new RegExp(`pid ${a.child.pid}\\b`), `the line names the holder: ${line}`);
      assert.equal(d.stderr.split("\n").filter((l) => /requests fail until/.test(l)).length, 1);

      // The first device stops (its VM paused or migrated away): the lock passes to the second,
      // which then serves, and sees what the first wrote.
      first.stop();
      assert.ok(await readOkWithin(second, 10_000), `second device never served:\n${d.stderr}`);
      const r = second.blk.read(0, 4096);
      assert.deepEqual(r.data, new Uint8Array(4096).fill(7));
      await d.waitFor(() => /lock taken; serving requests/.test(d.stderr), 10_000, "the handover");

      // And now QEMU is refused by the second.
      const q2 = await exitWithin(qemuDrive(image), 60_000);
      assert.ok(q2 !== null && q2.code !== 0, "QEMU started beside the second daemon");
    } finally {
      for (const s of sessions) s.close();
      await b?.stop();
      await a.stop();
    }
  });
});

Deno.test("image locking: a device refuses an image QEMU's own -drive holds, naming QEMU", async () => {
  await withDir("vhostd-lockq-", async (dir) => {
    const image = `${dir}/disk.img`;
    sparseFile(image, IMAGE_BYTES);
    const qemu = qemuDrive(image);
    let d: DaemonProcess | null = null;
    try {
      // QEMU opens its drives before it runs the main loop: give it time to take the lock.
      const early = await exitWithin(qemu, 3000);
      assert.equal(early, null, `QEMU exited: ${early?.stderr}`);
      d = await DaemonProcess.start(["blk", "--socket", `${dir}/d.sock`, "--image", image]);
      const dd = d;
      // Told at start already (a destination may legitimately wait for its source)...
      assert.match(dd.stderr, /is in use: pid \d+ \(qemu-system-x86/);
      const s = await BlkFrontend.open({ socket: `${dir}/d.sock` });
      try {
        // ...and refused once its device starts.
        assert.equal(s.blk.write(0, new Uint8Array(4096)).status, BlkStatus.IOERR);
        await dd.waitFor(() => /requests fail until/.test(dd.stderr), 10_000, "refusal");
      } finally {
        s.close();
      }
    } finally {
      await killQemu(qemu);
      await d?.stop();
    }
  });
});

Deno.test("image locking: --no-locking lets two daemons and QEMU share an image (cluster file systems)", async () => {
  await withDir("vhostd-nolock-", async (dir) => {
    const image = `${dir}/disk.img`;
    sparseFile(image, IMAGE_BYTES);
    const args = (n: string) => ["blk", "--socket", `${dir}/${n}.sock`, "--image", image];
    const a = await DaemonProcess.start([...args("a"), "--no-locking"]);
    const b = await DaemonProcess.start([...args("b"), "--no-locking"]);
    const sessions: BlkFrontend[] = [];
    try {
      for (const n of ["a", "b"]) {
        sessions.push(await BlkFrontend.open({ socket: `${dir}/${n}.sock` }));
      }
      assert.equal(sessions[0].blk.write(0, new Uint8Array(4096).fill(3)).status, BlkStatus.OK);
      assert.equal(sessions[1].blk.write(8, new Uint8Array(4096).fill(4)).status, BlkStatus.OK);
      assert.deepEqual(sessions[1].blk.read(0, 4096).data, new Uint8Array(4096).fill(3));
      // No lock held, so QEMU's own locking finds nothing to refuse either.
      const qemu = qemuDrive(image);
      const q = await exitWithin(qemu, 3000);
      await killQemu(qemu);
      assert.equal(q, null, `QEMU refused: ${q?.stderr}`);
      assert.doesNotMatch(a.stderr + b.stderr, /is in use/);
    } finally {
      for (const s of sessions) s.close();
      await b.stop();
      await a.stop();
    }
  });
});
