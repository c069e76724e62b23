/**
 * Hostile front-ends against a real daemon, one test per way an audit found to hurt the process
 * (the fixes came with 108f2a3; each test fails on the code before them, ad7603e). A front-end is
 * QEMU's side of vhost-user, trusted with guest memory but not with the daemon: whatever it sends,
 * the daemon logs one line and drops it (or refuses the request), neither crashes nor hangs, and
 * the other devices and connections of the same process keep serving.
 *
 * Block devices are served by `vhostd run --config` (one worker per device, one process); the
 * cases about one worker serving several sockets use `vhostd switch`, whose ports share a worker.
 */

import assert from "node:assert/strict";
import { DaemonProcess, openFdCount, sparseFile, withDir } from "./helpers/daemon.ts";
import { WRONG_KIND_SHOWN, WRONG_KINDS, wrongFd } from "./helpers/fds.ts";
import { mac, readUntil, tagged } from "./helpers/switch.ts";
import { straceDuring } from "./helpers/strace.ts";
import { type TrickleJob, TrickleState } from "./helpers/trickle_worker.ts";
import { BlkFrontend, FrontendConnection, GuestRam } from "../vhost-user/frontend/mod.ts";
import { NetDriver } from "../vhost-user/frontend/net_driver.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import { inflightQueueSize } from "../ring/inflight.ts";
import {
  encodeMessage,
  Flags,
  type InflightInfo,
  Request,
  requestName,
  u64Payload,
} from "../vhost-user/message.ts";
import { createMemfd } from "../sys/mman.ts";
import { closeQuietly } from "../sys/libc.ts";

const MiB = 1 << 20;
const TiB = 2 ** 40;
/** Anything the daemon may log when a worker dies or an exception escapes a handler. */
const CRASH = /data plane stopped|worker crashed|event handler failed|FTL/;

/** A daemon serving two disks from one process: one for the hostile front-end, one bystander. */
interface Disks {
  /** The daemon. */
  d: DaemonProcess;
  /** The hostile front-end's socket (device `victim`, 2 queues). */
  victim: string;
  /** A verified write and read-back on the bystander device. */
  checkBystander(what: string): void;
  /** Waits until the victim device has logged its `n`-th drop line and checks it is `reason`. */
  dropped(n: number, reason: RegExp): Promise<void>;
}

/** The drop lines device `device` logged so far. */
function dropLines(d: DaemonProcess, device: string): string[] {
  return d.stderr.split("\n").filter((l) => l.includes(`vhostd.${device}: dropping the front-end`));
}

/**
 * Waits until `device` has logged `n` drop lines, and checks the last one names `reason`. Lines
 * come one per dropped connection, so a count that runs ahead means one bad front-end cost more.
 */
async function expectDrop(d: DaemonProcess, device: string, n: number, reason: RegExp) {
  const what = `drop line ${n} of ${device}`;
  await d.waitFor(() => !d.alive || dropLines(d, device).length >= n, 15_000, what);
  if (!d.alive) {
    const { code, signal } = await d.child.status;
    assert.fail(`the daemon died (code ${code}, signal ${signal})\n${d.stderr}`);
  }
  const lines = dropLines(d, device);
  assert.equal(lines.length, n, `one line per dropped front-end:\n${lines.join("\n")}`);
  assert.match(lines[n - 1], reason);
}

/**
 * Runs `fn` against `vhostd run --config` serving `victim` (2 queues) and `bystander`. Afterwards
 * the bystander must still do verified I/O, the daemon must have logged no crash, and SIGTERM
 * must stop it with exit code 0.
 */
async function withDisks(fn: (t: Disks) => Promise<void>): Promise<void> {
  await withDir("vhostd-hostile-fe-", async (dir) => {
    sparseFile(`${dir}/victim.img`, 16 * MiB);
    sparseFile(`${dir}/bystander.img`, 16 * MiB);
    const devices = [
      { type: "blk", id: "victim", image: `${dir}/victim.img`, queues: 2 },
      { type: "blk", id: "bystander", image: `${dir}/bystander.img`, queues: 1 },
    ];
    Deno.writeTextFileSync(`${dir}/vm.json`, JSON.stringify({ socketDir: dir, devices }));
    const d = await DaemonProcess.start(["run", "--config", `${dir}/vm.json`]);
    let bystander: BlkFrontend | null = null;
    let passed = false;
    try {
      const by = bystander = await BlkFrontend.open({ socket: `${dir}/bystander.sock` });
      let checks = 0;
      const checkBystander = (what: string) => {
        const data = crypto.getRandomValues(new Uint8Array(4096));
        const sector = 8 * (checks++ % 1024);
        assert.equal(by.blk.write(sector, data).status, BlkStatus.OK, `${what}: bystander write`);
        const r = by.blk.read(sector, 4096);
        assert.equal(r.status, BlkStatus.OK, `${what}: bystander read`);
        assert.deepEqual(r.data, data, `${what}: bystander reads back what it wrote`);
      };
      checkBystander("before");
      await fn({
        d,
        victim: `${dir}/victim.sock`,
        checkBystander,
        dropped: (n, reason) => expectDrop(d, "victim", n, reason),
      });
      checkBystander("at the end");
      assert.ok(d.alive, "the daemon is alive");
      assert.doesNotMatch(d.stderr, CRASH);
      passed = true;
    } finally {
      bystander?.close();
      const stopped = d.stopWithin(30_000);
      if (passed) assert.equal(await stopped, 0, d.stderr);
      else await stopped.catch(() => {});
    }
  });
}

/** `vhostd switch` with `ports` ports (one worker serves them all). */
interface Switch {
  /** The daemon. */
  d: DaemonProcess;
  /** The ports' sockets. */
  socks: string[];
  /** A guest's driver on port `p`, closed at the end. */
  connect(p: number): Promise<NetDriver>;
}

/** Runs `fn` against `vhostd switch`; afterwards as {@link withDisks}. */
async function withSwitch(ports: number, fn: (s: Switch) => Promise<void>): Promise<void> {
  await withDir("vhostd-hostile-sw-", async (dir) => {
    const socks = Array.from({ length: ports }, (_, i) => `${dir}/p${i}.sock`);
    const d = await DaemonProcess.start(["switch", ...socks.flatMap((s) => ["--socket", s])]);
    const drivers: NetDriver[] = [];
    let passed = false;
    try {
      await fn({
        d,
        socks,
        async connect(p) {
          const drv = await NetDriver.connect(socks[p]);
          drivers.push(drv);
          return drv;
        },
      });
      assert.ok(d.alive, "the daemon is alive");
      assert.doesNotMatch(d.stderr, CRASH);
      passed = true;
    } finally {
      for (const drv of drivers) drv.close();
      const stopped = d.stopWithin(30_000);
      if (passed) assert.equal(await stopped, 0, d.stderr);
      else await stopped.catch(() => {});
    }
  });
}

/** The description of an inflight buffer for `numQueues` queues of `queueSize`, at offset 0. */
function inflightInfo(numQueues: number, queueSize: number): InflightInfo {
  return {
    numQueues,
    queueSize,
    mmapSize: numQueues * inflightQueueSize(queueSize),
    mmapOffset: 0,
  };
}

/** A frame from port `from`'s guest reaches port `to`'s guest, tagged `tag`. */
function frameGoesThrough(from: NetDriver, to: NetDriver, fromMac: number, tag: string): void {
  from.send(tagged(mac(99), mac(fromMac), tag));
  readUntil(to, tag);
}

Deno.test("hostile front-end: an inflight fd shorter than the buffer it describes is refused (it was SIGBUS for every device)", async () => {
  await withDisks(async (t) => {
    // Two queues of 256: 8320 bytes, the second queue's slots all past the first page.
    const info = inflightInfo(2, 256);
    const cases: [string, number, typeof info][] = [
      ["a memfd of one page", 4096, info],
      ["a memfd of the right size, at an offset past its end", info.mmapSize, {
        ...info,
        mmapOffset: 4096,
      }],
    ];
    for (const [i, [what, size, layout]] of cases.entries()) {
      const fd = createMemfd("vhostd-test-short-inflight", size);
      await assert.rejects(async () => {
        const fe = await BlkFrontend.open({
          socket: t.victim,
          queues: 2,
          inflightBuffer: { info: layout, fd },
        });
        try {
          // Accepted, the first request on queue 1 marks its slot past the end of the file.
          fe.blk.write(0, new Uint8Array(4096), 1);
        } finally {
          fe.close();
        }
      }, `${what}: refused`);
      await t.dropped(
        i + 1,
        /SET_INFLIGHT_FD: inflight buffer of 8320 bytes at offset \d+ is larger than its fd/,
      );
      t.checkBystander(what);
    }
  });
});

Deno.test("hostile front-end: pipes, sockets and memfds where an eventfd belongs are refused (a pipe call fd hung the worker)", async () => {
  await withDisks(async (t) => {
    const requests = [
      Request.SET_VRING_CALL,
      Request.SET_VRING_KICK,
      Request.SET_VRING_ERR,
      Request.SET_LOG_FD,
    ];
    const kinds = WRONG_KINDS.filter((k) => k !== "eventfd");
    let n = 0;
    for (const request of requests) {
      for (const kind of kinds) {
        const what = `${requestName(request)} with a ${kind}`;
        const fe = await BlkFrontend.open({ socket: t.victim, queues: 2 });
        const { fd, all } = wrongFd(kind);
        try {
          const payload = request === Request.SET_LOG_FD ? undefined : u64Payload(1n);
          assert.throws(() => fe.conn.request(request, payload, [fd]), `${what}: refused`);
          assert.ok(fe.conn.waitClosed(), `${what}: the connection is dropped`);
        } finally {
          fe.close();
          for (const f of all) closeQuietly(f);
        }
        const reason = new RegExp(
          `: ${requestName(request)}: the fd is a ${WRONG_KIND_SHOWN[kind]}, not an eventfd$`,
        );
        await t.dropped(++n, reason);
        t.checkBystander(what);
      }
    }
  });
});

Deno.test("hostile front-end: a message trickled a byte a second holds only its own socket; the worker's other ports go on", async () => {
  await withSwitch(3, async (s) => {
    const a = await s.connect(1);
    const b = await s.connect(2);
    frameGoesThrough(a, b, 1, "before");
    // A whole GET_FEATURES header takes 12 s at this pace: far longer than the daemon waits.
    const header = encodeMessage(Request.GET_FEATURES, Flags.VERSION);
    const state = new Int32Array(new SharedArrayBuffer(4 * TrickleState.SIZE));
    const worker = new Worker(new URL("./helpers/trickle_worker.ts", import.meta.url).href, {
      type: "module",
    });
    try {
      const job: TrickleJob = {
        socket: s.socks[0],
        bytes: header,
        intervalMs: 1000,
        state: state.buffer as SharedArrayBuffer,
      };
      worker.postMessage(job);
      await s.d.waitFor(() => Atomics.load(state, TrickleState.SENT) >= 1, 10_000, "a byte");
      // Port 0's header is part-way in: the worker must not wait for the rest of it.
      frameGoesThrough(a, b, 1, "while port 0 trickles");
      frameGoesThrough(b, a, 2, "and back");
      a.conn.getFeatures();
      const sent = Atomics.load(state, TrickleState.SENT);
      assert.ok(
        sent < header.length && Atomics.load(state, TrickleState.DONE) === 0,
        `the other ports were served while port 0's header was part-way in (${sent} bytes)`,
      );
      await expectDrop(
        s.d,
        "switch.port0",
        1,
        /sent part of a message and not the rest within \d+ ms/,
      );
      await s.d.waitFor(() => Atomics.load(state, TrickleState.DONE) !== 0, 20_000, "trickler");
      assert.equal(
        Atomics.load(state, TrickleState.DONE),
        TrickleState.REFUSED,
        "the rest of the header found the connection closed",
      );
      assert.equal(dropLines(s.d, "switch.port0").length, 1, "one line");
      frameGoesThrough(a, b, 1, "after");
    } finally {
      worker.terminate();
    }
  });
});

/** Runs `fn` while strace records the daemon's close() calls that fail; returns those lines. */
async function failedCloses(pid: number, fn: () => Promise<void>): Promise<string[]> {
  const lines = await straceDuring(pid, ["-Z", "-e", "trace=close"], fn, 1000);
  return lines.filter((l) => l.includes("close("));
}

Deno.test("hostile front-end: SET_MEM_TABLE closes each region fd once, accepted or refused (a second close can hit another thread's fd)", async () => {
  await withDisks(async (t) => {
    const failed = await failedCloses(t.d.child.pid, async () => {
      // A table QEMU would send: two regions, each with its own fd (here both of one memfd).
      const fe = await BlkFrontend.open({ socket: t.victim, queues: 2, memSlots: false });
      try {
        const data = crypto.getRandomValues(new Uint8Array(4096));
        assert.equal(fe.blk.write(8, data).status, BlkStatus.OK);
        assert.deepEqual(fe.blk.read(8, 4096).data, data);
      } finally {
        fe.close();
      }
      // A table whose second region is larger than its fd: refused, and the connection dropped.
      const c = await FrontendConnection.connect(t.victim);
      const ram = GuestRam.create();
      const small = createMemfd("vhostd-test-small-region", 4096);
      try {
        c.setProtocolFeatures(c.getProtocolFeatures());
        assert.throws(() => c.setMemTable([...ram.regions], [ram.fd, small]));
        assert.ok(c.waitClosed(), "the connection is dropped");
      } finally {
        c.close();
        ram.close();
        closeQuietly(small);
      }
      await t.dropped(1, /SET_MEM_TABLE: memory region of \d+ bytes at offset \d+ is larger/);
      t.checkBystander("after the refused table");
    });
    assert.deepEqual(failed, [], "no close() failed: none was given an fd already closed");
  });
});

/** The daemon's virtual memory size in bytes. */
function vmSize(pid: number): number {
  const m = /VmSize:\s+(\d+) kB/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (m === null) throw new Error(`no VmSize for pid ${pid}`);
  return Number(m[1]) * 1024;
}

Deno.test("hostile front-end: guest RAM 64 TiB into its memfd is served without mapping the 64 TiB before it", async () => {
  await withDisks(async (t) => {
    const pid = t.d.child.pid;
    // A region claiming to lie 64 TiB into a 16 MiB memfd: refused.
    const c = await FrontendConnection.connect(t.victim);
    const fd = createMemfd("vhostd-test-region", 16 * MiB);
    try {
      c.setProtocolFeatures(c.getProtocolFeatures());
      const region = {
        guestPhysAddr: 0,
        memorySize: 16 * MiB,
        userspaceAddr: 0,
        mmapOffset: 64 * TiB,
      };
      assert.throws(() => c.addMemReg(region, fd));
      assert.ok(c.waitClosed(), "the connection is dropped");
    } finally {
      c.close();
      closeQuietly(fd);
    }
    await t.dropped(
      1,
      /ADD_MEM_REG: memory region of 16777216 bytes at offset 70368744177664 is larger than its fd/,
    );
    // Guest RAM really 64 TiB into a sparse memfd, shared both ways QEMU shares it.
    const before = vmSize(pid);
    for (const memSlots of [true, false]) {
      const what = memSlots ? "ADD_MEM_REG" : "SET_MEM_TABLE";
      const fe = await BlkFrontend.open({
        socket: t.victim,
        queues: 2,
        ramFileOffset: 64 * TiB,
        memSlots,
      });
      try {
        for (const q of [0, 1]) {
          const data = crypto.getRandomValues(new Uint8Array(4096));
          assert.equal(fe.blk.write(64 + q * 8, data, q).status, BlkStatus.OK, `${what}: write`);
          assert.deepEqual(fe.blk.read(64 + q * 8, 4096, q).data, data, `${what}: read back`);
        }
        const grown = vmSize(pid) - before;
        assert.ok(grown < TiB, `${what}: the daemon mapped ${grown} bytes more, not 64 TiB`);
      } finally {
        fe.close();
      }
      t.checkBystander(what);
    }
  });
});

Deno.test("hostile front-end: an inflight buffer for smaller queues than the rings is refused (heads wrote into the next queue's slots)", async () => {
  await withDisks(async (t) => {
    const info = inflightInfo(2, 64);
    // QEMU's order: the buffer first, then rings of 128.
    const fd = createMemfd("vhostd-test-inflight", info.mmapSize);
    await assert.rejects(
      BlkFrontend.open({
        socket: t.victim,
        queues: 2,
        queueSize: 128,
        inflightBuffer: { info, fd },
      }),
      "rings larger than the buffer's queues are refused",
    );
    await t.dropped(1, /SET_VRING_NUM: queue size 128 is larger than the inflight buffer's 64$/);
    t.checkBystander("after SET_VRING_NUM");
    // The other order: rings of 128 running, then a buffer for queues of 64.
    const fe = await BlkFrontend.open({ socket: t.victim, queues: 2, queueSize: 128 });
    const small = createMemfd("vhostd-test-inflight", info.mmapSize);
    try {
      assert.equal(fe.blk.write(0, new Uint8Array(4096).fill(1)).status, BlkStatus.OK);
      assert.throws(() => fe.conn.setInflightFd(info, small), "a buffer too small is refused");
      assert.ok(fe.conn.waitClosed(), "the connection is dropped");
    } finally {
      fe.close();
      closeQuietly(small);
    }
    await t.dropped(2, /inflight buffer for queues of 64 but queue 0 has 128$/);
  });
});

Deno.test("front-end reconnect: setting a call fd interrupts the driver at once, so an interrupt lost meanwhile is not waited for forever", async () => {
  await withDisks(async (t) => {
    const fe = await BlkFrontend.open({ socket: t.victim, queues: 2 });
    try {
      const data = crypto.getRandomValues(new Uint8Array(4096));
      for (const q of [0, 1]) assert.equal(fe.blk.write(8, data, q).status, BlkStatus.OK);
      for (const q of fe.queues) q.waitCall(0);
      // QEMU redials after a back-end restart and sets every call fd again: a completion the old
      // connection never signalled must not leave the guest waiting.
      await fe.reconnect();
      for (const q of fe.queues) {
        assert.ok(q.waitCall(0), `queue ${q.index}: interrupted when its call fd was set`);
      }
      assert.deepEqual(fe.blk.read(8, 4096, 1).data, data);
    } finally {
      fe.close();
    }
    t.checkBystander("after the reconnect");
  });
});

Deno.test("hostile front-end: one that never reads its replies is dropped with one line; the worker's other ports go on", async () => {
  await withSwitch(3, async (s) => {
    const a = await s.connect(1);
    const b = await s.connect(2);
    const flood = await FrontendConnection.connect(s.socks[0]);
    try {
      // 256 GET_FEATURES at a time, never a reply read: the daemon's side of the socket fills.
      const one = encodeMessage(Request.GET_FEATURES, Flags.VERSION);
      const burst = new Uint8Array(one.length * 256);
      for (let i = 0; i < 256; i++) burst.set(one, i * one.length);
      for (let i = 0; i < 64 && dropLines(s.d, "switch.port0").length === 0; i++) {
        try {
          flood.sendBytes(burst);
        } catch {
          break; // the daemon hung up
        }
        frameGoesThrough(a, b, 1, `during burst ${i}`);
      }
      await expectDrop(
        s.d,
        "switch.port0",
        1,
        /its socket is full: the front-end does not read the replies$/,
      );
      let replies = 0;
      for (;;) {
        try {
          flood.receiveRaw();
          replies++;
        } catch {
          break;
        }
      }
      assert.ok(flood.waitClosed(), `the connection is closed after the ${replies} replies sent`);
      frameGoesThrough(a, b, 1, "after");
      assert.equal(a.conn.getFeatures() !== 0n, true, "port 1 answers requests");
    } finally {
      flood.close();
    }
  });
});

Deno.test({
  name: "hostile front-end: the fd of a region or log whose fields do not fit a number is closed",
  // Found by the fuzzer: ADD_MEM_REG and SET_LOG_BASE took their fd before decoding fields that
  // may throw (a value of 2^53 or more), and the fd was then never closed: 10 connections leaked
  // 10 fds, and enough of them leave every device of the process unable to accept a front-end.
  fn: () =>
    withDisks(async (t) => {
      const fdsBefore = openFdCount(t.d.child.pid);
      const cases: [string, number, Uint8Array][] = [
        ["ADD_MEM_REG", Request.ADD_MEM_REG, new Uint8Array(40)],
        ["SET_LOG_BASE", Request.SET_LOG_BASE, new Uint8Array(16)],
      ];
      let n = 0;
      for (const [what, request, payload] of cases) {
        // The first field (ADD_MEM_REG: guest address after the padding; the log's size): 2^60.
        new DataView(payload.buffer).setBigUint64(
          request === Request.ADD_MEM_REG ? 8 : 0,
          1n << 60n,
          true,
        );
        for (let i = 0; i < 10; i++) {
          const c = await FrontendConnection.connect(t.victim);
          const fd = createMemfd("vhostd-test-region", 4096);
          try {
            c.setProtocolFeatures(c.getProtocolFeatures());
            c.sendRaw(request, Flags.VERSION, payload, [fd]);
            assert.ok(c.waitClosed(), `${what}: the connection is dropped`);
          } finally {
            c.close();
            closeQuietly(fd);
          }
          await t.dropped(++n, new RegExp(`${what}: u64 value too large`));
        }
      }
      await new Promise((r) => setTimeout(r, 300));
      const fdsAfter = openFdCount(t.d.child.pid);
      assert.ok(
        fdsAfter <= fdsBefore + 2,
        `the daemon's fds went from ${fdsBefore} to ${fdsAfter}`,
      );
    }),
});
