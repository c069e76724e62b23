import assert from "node:assert/strict";
import { createMemfd } from "../sys/mman.ts";
import { createEventFd, drainEventFd } from "../sys/event.ts";
import { openFdCount } from "../tests/helpers/daemon.ts";
import { DirtyLog, DirtyLogError } from "./dirty_log.ts";

Deno.test("the dirty log marks every page a write touches, and only those", () => {
  const log = new DirtyLog();
  try {
    log.map(createMemfd("log", 4096), 4096, 0);
    assert.equal(log.pages, 4096 * 8);
    log.mark(0x1000, 1); // page 1
    log.mark(0x3fff, 2); // pages 3 and 4
    log.mark(0x10000, 0x2000); // pages 16 and 17
    const marked = [...Array(32).keys()].filter((p) => log.isMarked(p));
    assert.deepEqual(marked, [1, 3, 4, 16, 17]);
  } finally {
    log.close();
  }
});

Deno.test("the log is read from its offset in the fd (an unaligned one too)", () => {
  const fd = createMemfd("log", 3 * 4096);
  const log = new DirtyLog();
  try {
    log.map(fd, 4096, 4096 + 8);
    log.mark(9 * 4096, 1); // page 9: byte 1, bit 1 of the bitmap
    assert.ok(log.isMarked(9));
  } finally {
    log.close();
  }
});

Deno.test("a log larger than its fd, or not a file, is refused (it would be SIGBUS)", () => {
  const before = openFdCount();
  const log = new DirtyLog();
  assert.throws(() => log.map(createMemfd("short", 4096), 8192, 0), DirtyLogError);
  assert.throws(() => log.map(createMemfd("short", 4096), 4096, 1), /larger than its fd/);
  assert.throws(() => log.map(createEventFd(), 8, 0), /not a memory file/);
  assert.throws(() => log.map(createMemfd("zero", 4096), 0, 0), DirtyLogError);
  assert.equal(log.mapped, false);
  assert.equal(openFdCount(), before, "every refused fd was closed");
});

Deno.test("marks past the log's end are counted, not written", () => {
  const log = new DirtyLog();
  try {
    log.map(createMemfd("log", 4096), 1, 0); // 8 pages
    log.mark(7 * 4096, 2 * 4096);
    assert.ok(log.isMarked(7));
    assert.equal(log.outside, 1);
  } finally {
    log.close();
  }
});

Deno.test("SET_LOG_FD's eventfd is signalled once per batch of marks", () => {
  const log = new DirtyLog();
  const fd = createEventFd();
  try {
    log.map(createMemfd("log", 4096), 4096, 0);
    log.setNotifyFd(fd);
    log.notify();
    assert.equal(drainEventFd(fd), 0, "nothing marked, nothing signalled");
    log.mark(0, 1);
    log.mark(4096, 1);
    log.notify();
    assert.equal(drainEventFd(fd), 1);
  } finally {
    log.close(); // closes fd
  }
});

Deno.test("a long range is marked exactly, across byte boundaries", () => {
  const log = new DirtyLog();
  try {
    log.map(createMemfd("log", 4096), 64, 0);
    log.mark(3 * 4096 + 100, 20 * 4096); // pages 3 to 23
    const marked = [...Array(64 * 8).keys()].filter((p) => log.isMarked(p));
    assert.deepEqual(marked, [...Array(21).keys()].map((i) => i + 3));
  } finally {
    log.close();
  }
});
