import assert from "node:assert/strict";
import { closeQuietly, Errno, O, openFile } from "../../sys/libc.ts";
import { createPipe } from "../../tests/helpers/fds.ts";
import { IOWQ_MAX_WORKERS, ioWqWorkerCap, UringEngine } from "./uring.ts";
import { IoUringOp } from "../../sys/io_uring.ts";

const owner = {
  finish: () => assert.fail("a background sync completes no request"),
  resume: () => undefined,
};

Deno.test("uring: a background sync runs once at a time and holds a slot until it completes", () => {
  const path = Deno.makeTempFileSync();
  Deno.writeFileSync(path, new Uint8Array(4096).fill(1));
  const fd = openFile(path, O.RDWR);
  const engine = new UringEngine(fd, 4, 4, owner);
  try {
    assert.equal(engine.syncInBackground(), true);
    assert.equal(engine.inFlight, 1, "the sync holds a slot (quiesce waits for it)");
    assert.equal(engine.syncInBackground(), false, "one at a time");
    engine.drain();
    assert.equal(engine.inFlight, 0);
    assert.equal(engine.takeSyncError(), 0);
    assert.equal(engine.syncInBackground(), true, "the next one may start");
  } finally {
    engine.close();
    closeQuietly(fd);
    Deno.removeSync(path);
  }
});

Deno.test("uring: a background sync's error is kept for the next flush, once", () => {
  // fdatasync of a pipe fails with EINVAL: a real error from the kernel through the ring.
  const [r, w] = createPipe();
  const engine = new UringEngine(w, 4, 4, owner);
  try {
    assert.equal(engine.syncInBackground(), true);
    engine.drain();
    assert.equal(engine.takeSyncError(), -Errno.EINVAL);
    assert.equal(engine.takeSyncError(), 0, "taken once");
  } finally {
    engine.close();
    closeQuietly(r);
    closeQuietly(w);
  }
});

Deno.test("uring: a short read is resubmitted for the rest; at the end of the file it ends short", () => {
  // 6 KiB of data; a 12 KiB read from 2 KiB: the kernel stops at the end of the file, the engine
  // asks for the rest, which reads nothing: the request ends with the 4 KiB there were.
  const path = Deno.makeTempFileSync();
  Deno.writeFileSync(path, new Uint8Array(6144).fill(7));
  const fd = openFile(path, O.RDONLY);
  const results: number[] = [];
  const engine = new UringEngine(fd, 4, 4, {
    finish: (_slot, result) => void results.push(result),
    resume: () => undefined,
  });
  const buf = new Uint8Array(12288);
  try {
    const queue = {} as Parameters<UringEngine["take"]>[0];
    const slot = engine.take(queue)!;
    slot.iov.push(Number(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf))), 12288);
    slot.op = IoUringOp.READV;
    slot.expected = 12288;
    slot.offset = 2048;
    engine.queue(slot);
    engine.drain();
    assert.deepEqual(results, [4096], "one completion, with every byte read");
    assert.ok(buf.subarray(0, 4096).every((b) => b === 7));
    assert.equal(engine.inFlight, 0);
  } finally {
    engine.close();
    closeQuietly(fd);
    Deno.removeSync(path);
  }
});

Deno.test("uring: the io-wq threads are capped where the kernel allows it (5.15 and later)", () => {
  const path = Deno.makeTempFileSync();
  const fd = openFile(path, O.RDONLY);
  const engine = new UringEngine(fd, 4, 4, owner);
  try {
    const [major, minor] = Deno.osRelease().split(".").map(Number);
    if (major > 5 || (major === 5 && minor >= 15)) {
      assert.equal(engine.workerLimit, ioWqWorkerCap());
      assert.ok(engine.workerLimit! <= IOWQ_MAX_WORKERS);
    } else {
      assert.equal(engine.workerLimit, null);
    }
  } finally {
    engine.close();
    closeQuietly(fd);
    Deno.removeSync(path);
  }
});
