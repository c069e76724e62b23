import assert from "node:assert/strict";
import { closeQuietly, Errno, O, openFile } from "../../sys/libc.ts";
import { createPipe } from "../../tests/helpers/fds.ts";
import { UringEngine } from "./uring.ts";

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
