/**
 * WRITE_ZEROES on a file system that cannot zero a range itself (ext2: no FALLOC_FL_ZERO_RANGE),
 * where the device has to write the zeros. One request may name 32 ranges of up to 2 GiB; done in
 * one go it held the worker, and every other queue of the device, for as long as the writes took.
 * Now the zeros go out in bounded steps between other requests: the device's other queue is served
 * while the request runs, and the ranges read back as zeros afterwards.
 *
 * Needs root (a loop-mounted ext2 image inside the test's directory).
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile, withDir } from "./helpers/daemon.ts";
import { BlkFrontend, rangesPayload } from "../vhost-user/frontend/mod.ts";
import { BlkRequestType, BlkStatus } from "../devices/blk/device.ts";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE, fallocate } from "../sys/io.ts";
import { closeQuietly, Errno, O, openFile } from "../sys/libc.ts";

const MiB = 1 << 20;
const SECTOR = 512;

/** Runs a command; throws with its stderr when it fails. */
async function run(cmd: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command(cmd, { args, stdout: "null", stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`${cmd} ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** Runs `fn` with an ext2 file system of `bytes` loop-mounted at `dir/mnt`. */
async function withExt2(dir: string, bytes: number, fn: (mnt: string) => Promise<void>) {
  sparseFile(`${dir}/fs.img`, bytes);
  await run("mkfs.ext2", "-q", "-F", `${dir}/fs.img`);
  const mnt = `${dir}/mnt`;
  Deno.mkdirSync(mnt);
  await run("mount", "-o", "loop", `${dir}/fs.img`, mnt);
  try {
    await fn(mnt);
  } finally {
    // Lazily, should a daemon that failed to stop still hold its image: the test dir goes anyway.
    await run("umount", mnt).catch(() => run("umount", "-l", mnt));
  }
}

/** The device's engines and loop modes: the zeroing must take turns with each. */
const VARIANTS: [string, string[]][] = [
  ["busy-polling (the default)", []],
  ["kicks only", ["--poll-us", "0"]],
  ["io_uring on O_DIRECT", ["--direct"]],
];

for (const [variant, extra] of VARIANTS) {
  Deno.test(`WRITE_ZEROES without fallocate zeroing (ext2), ${variant}: zeros written in steps while the device's other queue is served`, async () => {
    await withDir(
      "vhostd-zeroes-",
      (dir) => withExt2(dir, 256 * MiB, (mnt) => zeroesTest(dir, mnt, extra)),
    );
  });
}

/** Serves an image on `mnt` and zeroes 2 GiB on queue 0 while queue 1 does verified I/O. */
async function zeroesTest(dir: string, mnt: string, extra: string[]): Promise<void> {
  const image = `${mnt}/disk.img`;
  sparseFile(image, 128 * MiB);
  const fd = openFile(image, O.RDWR);
  try {
    const rc = fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 0, 4096);
    assert.equal(rc, -Errno.EOPNOTSUPP, "ext2 cannot zero a range: the device writes zeros");
  } finally {
    closeQuietly(fd);
  }
  const sock = `${dir}/blk.sock`;
  const args = ["blk", "--socket", sock, "--image", image, "--queues", "2", ...extra];
  const d = await DaemonProcess.start(args);
  const fe = await BlkFrontend.open({ socket: sock, queues: 2 });
  let passed = false;
  try {
    const zone = (64 * MiB) / SECTOR;
    const marks = [0, zone / 2, zone - 8];
    const ones = new Uint8Array(4096).fill(0xff);
    for (const s of marks) assert.equal(fe.blk.write(s, ones).status, BlkStatus.OK);
    // 32 ranges naming the same 64 MiB: 2 GiB of zeros to write, on 64 MiB of disk.
    const ranges = Array.from({ length: 32 }, () => ({ sector: 0, sectors: zone }));
    const q0 = fe.queues[0];
    const before = q0.usedIdx;
    const zeroing = fe.blk.submit({
      type: BlkRequestType.WRITE_ZEROES,
      out: rangesPayload(ranges, false),
      queue: 0,
    });
    // Queue 1 writes and reads back outside the zeroed range for as long as queue 0's
    // request is not complete; a worker stuck in that request serves none of it.
    let during = 0;
    for (let i = 0; q0.usedIdx === before; i++) {
      const data = crypto.getRandomValues(new Uint8Array(4096));
      const sector = zone + 8 * (i % 4096);
      const w = fe.blk.wait(
        fe.blk.submit({ type: BlkRequestType.OUT, sector, out: data, queue: 1 }),
        120_000,
      );
      assert.equal(w.status, BlkStatus.OK, "queue 1 writes");
      const r = fe.blk.wait(
        fe.blk.submit({ type: BlkRequestType.IN, sector, inBytes: 4096, queue: 1 }),
        120_000,
      );
      assert.deepEqual(r.data, data, "queue 1 reads back what it wrote");
      if (q0.usedIdx === before) during++;
    }
    assert.ok(during > 0, `queue 1 completed ${during} requests while queue 0 zeroed 2 GiB`);
    assert.equal(fe.blk.wait(zeroing, 120_000).status, BlkStatus.OK, "the zeroing succeeds");
    for (const s of marks) {
      const r = fe.blk.read(s, 4096);
      assert.ok(r.data.every((b) => b === 0), `sector ${s} reads back as zeros`);
    }
    assert.doesNotMatch(d.stderr, /ERR|data plane stopped|worker crashed/);
    passed = true;
  } finally {
    fe.close();
    const stopped = d.stopWithin(60_000);
    if (passed) assert.equal(await stopped, 0, d.stderr);
    else await stopped.catch(() => {});
  }
}
