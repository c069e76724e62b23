import assert from "node:assert/strict";
import { createMemfd } from "../sys/mman.ts";
import { createEventFd } from "../sys/event.ts";
import { GuestMemory, MemoryError } from "./guest_memory.ts";
import { openFdCount } from "../tests/helpers/daemon.ts";

const MiB = 1 << 20;

Deno.test("translation finds the right region and refuses ranges that cross its end", () => {
  const m = new GuestMemory();
  try {
    const low = m.add(
      { guestPhysAddr: 0, memorySize: MiB, userspaceAddr: 0x7000_0000_0000, mmapOffset: 0 },
      createMemfd("low", MiB),
    );
    const high = m.add(
      { guestPhysAddr: 4 * MiB, memorySize: MiB, userspaceAddr: 0x7100_0000_0000, mmapOffset: 0 },
      createMemfd("high", MiB),
    );
    assert.equal(m.findGpa(0, 16), low);
    assert.equal(m.findGpa(MiB - 16, 16), low);
    assert.equal(m.findGpa(MiB - 15, 16), null, "crosses the end of the low region");
    assert.equal(m.findGpa(2 * MiB, 1), null, "in the hole between regions");
    assert.equal(m.findGpa(4 * MiB + 100, 100), high);
    assert.equal(m.findGpa(5 * MiB, 1), null);
    assert.equal(m.findUva(0x7100_0000_0000 + 10, 10), high);
    assert.equal(m.findUva(0x7100_0000_0000 + MiB, 1), null);
    // Both views see the same bytes the front-end wrote through its own address space.
    high.u8[high.base + 100] = 7;
    assert.equal(high.view.getUint8(100), 7);
  } finally {
    m.clear();
  }
});

Deno.test("a region with an mmap offset maps the fd from that offset", () => {
  const m = new GuestMemory();
  try {
    const fd = createMemfd("off", 2 * MiB);
    const r = m.add(
      { guestPhysAddr: 0x1000, memorySize: MiB, userspaceAddr: 0x7000_0000_0000, mmapOffset: MiB },
      fd,
    );
    // Only the region's own pages are mapped: a huge offset must not reserve address space.
    assert.equal(r.u8.length, MiB);
    assert.equal(r.base, 0);
    assert.equal(r.hostAddress % 4096, 0);
    assert.ok(m.findGpa(0x1000 + MiB - 1, 1));
  } finally {
    m.clear();
  }
});

Deno.test("overlapping, empty and absurd regions are refused, and their fds closed", () => {
  const m = new GuestMemory();
  const before = openFdCount();
  try {
    m.add(
      { guestPhysAddr: 0, memorySize: MiB, userspaceAddr: 0x7000_0000_0000, mmapOffset: 0 },
      createMemfd("a", MiB),
    );
    const bad = [
      { guestPhysAddr: MiB / 2, memorySize: MiB, userspaceAddr: 0x7200_0000_0000, mmapOffset: 0 },
      { guestPhysAddr: 8 * MiB, memorySize: 0, userspaceAddr: 0x7300_0000_0000, mmapOffset: 0 },
      { guestPhysAddr: 2 ** 53 - 10, memorySize: MiB, userspaceAddr: 0, mmapOffset: 0 },
      { guestPhysAddr: 8 * MiB, memorySize: MiB, userspaceAddr: 0, mmapOffset: 3 },
    ];
    for (const info of bad) {
      assert.throws(() => m.add(info, createMemfd("bad", MiB)), MemoryError);
    }
    assert.equal(m.regions.length, 1);
  } finally {
    m.clear();
  }
  assert.equal(openFdCount(), before, "no fd leaked");
});

Deno.test("a region larger than its fd is refused (it would be SIGBUS when touched)", () => {
  const m = new GuestMemory();
  try {
    assert.throws(
      () =>
        m.add(
          { guestPhysAddr: 0, memorySize: 1 << 30, userspaceAddr: 0, mmapOffset: 0 },
          createMemfd("tiny", 4096),
        ),
      /larger than its fd/,
    );
    assert.throws(
      () =>
        m.add(
          { guestPhysAddr: 0, memorySize: MiB, userspaceAddr: 0, mmapOffset: MiB },
          createMemfd("short", MiB + 4096),
        ),
      /larger than its fd/,
    );
    assert.equal(m.regions.length, 0);
  } finally {
    m.clear();
  }
});

Deno.test("removal unmaps and detaches the views instead of leaving them dangling", () => {
  const m = new GuestMemory();
  const info = {
    guestPhysAddr: 0,
    memorySize: MiB,
    userspaceAddr: 0x7000_0000_0000,
    mmapOffset: 0,
  };
  const r = m.add(info, createMemfd("r", MiB));
  const gen = m.generation;
  assert.equal(m.remove({ ...info, userspaceAddr: 1 }), false, "must match exactly");
  assert.equal(m.remove(info), true);
  assert.ok(m.generation > gen);
  assert.equal(r.u8.length, 0, "a stale view reads as empty, not as freed memory");
  assert.equal(m.findGpa(0, 1), null);
});

Deno.test("the slot limit is enforced", () => {
  const m = new GuestMemory(2);
  try {
    for (let i = 0; i < 2; i++) {
      m.add(
        { guestPhysAddr: i * MiB, memorySize: MiB, userspaceAddr: i * MiB, mmapOffset: 0 },
        createMemfd("s", MiB),
      );
    }
    assert.throws(
      () =>
        m.add(
          { guestPhysAddr: 9 * MiB, memorySize: MiB, userspaceAddr: 9 * MiB, mmapOffset: 0 },
          createMemfd("s", MiB),
        ),
      /too many memory regions/,
    );
  } finally {
    m.clear();
  }
});

Deno.test("a region far into its fd maps only its own pages (no address-space blow-up)", () => {
  const m = new GuestMemory();
  const offset = 100 * 2 ** 40; // 100 TiB into a sparse memfd
  const fd = createMemfd("far", offset + MiB);
  try {
    const r = m.add(
      { guestPhysAddr: 0, memorySize: MiB, userspaceAddr: 0x7000_0000_0000, mmapOffset: offset },
      fd,
    );
    assert.equal(r.u8.length, MiB);
    r.u8[r.base + MiB - 1] = 42;
    assert.equal(r.u8[r.offsetOfGpa(MiB - 1)], 42);
  } finally {
    m.clear();
  }
});

Deno.test("memory fds that are not files (an eventfd here) are refused, and closed", () => {
  const m = new GuestMemory();
  const before = openFdCount();
  assert.throws(
    () =>
      m.add(
        { guestPhysAddr: 0, memorySize: 4096, userspaceAddr: 0, mmapOffset: 0 },
        createEventFd(),
      ),
    /is a eventfd, not a memory file/,
  );
  assert.equal(openFdCount(), before);
});

Deno.test("bounds checks stay exact next to 2^53", () => {
  const m = new GuestMemory();
  try {
    const top = 2 ** 53;
    const r = m.add(
      { guestPhysAddr: top - MiB, memorySize: MiB, userspaceAddr: top - MiB, mmapOffset: 0 },
      createMemfd("top", MiB),
    );
    assert.equal(r.containsGpa(top - 1, 1), true);
    assert.equal(r.containsGpa(top - 1, 2), false, "one byte past the end");
    assert.equal(r.containsGpa(top - 3, 4), false);
    assert.equal(r.containsUva(top - 1, 2), false);
    assert.equal(m.findGpa(top - 1, 2), null);
  } finally {
    m.clear();
  }
});
