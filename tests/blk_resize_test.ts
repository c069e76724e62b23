/**
 * Online resize of a disk, without a guest: a real `vhostd blk` daemon and the in-repo front-end
 * library. After the image grows, `vhostd resize` (or SIGHUP) makes the daemon serve the new
 * capacity and send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the back-end request channel, which
 * is what QEMU turns into a config interrupt for the guest (tests/blk_guest_test.ts shows the
 * guest side). A front-end that never reads that channel, or hands over a bad fd for it, costs
 * nothing but its own channel.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";
import { WRONG_KIND_SHOWN, WRONG_KINDS, wrongFd } from "./helpers/fds.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import {
  BlkFrontend,
  decodeBlkConfig,
  FrontendConnection,
  NackError,
} from "../vhost-user/frontend/mod.ts";
import {
  BackendRequest,
  bit,
  Flags,
  ProtocolFeature,
  Request,
  requestName,
} from "../vhost-user/message.ts";
import { requestResize } from "../daemon/control.ts";
import { closeQuietly } from "../sys/libc.ts";

const MiB = 1 << 20;
const SECTOR = 512;

/** A `vhostd blk` daemon on a 64 MiB image, with a control socket. */
interface Disk {
  d: DaemonProcess;
  socket: string;
  control: string;
  image: string;
}

async function withDisk(fn: (disk: Disk) => Promise<void>): Promise<void> {
  await withDir("vhostd-resize-", async (dir) => {
    const image = `${dir}/disk.img`;
    sparseFile(image, 64 * MiB);
    const socket = `${dir}/disk.sock`;
    const control = `${dir}/control.sock`;
    const d = await DaemonProcess.start([
      "blk",
      "--socket",
      socket,
      "--image",
      image,
      "--queues",
      "1",
      "--control",
      control,
    ]);
    try {
      await fn({ d, socket, control, image });
    } catch (e) {
      (e as Error).message += `\n--- vhostd stderr ---\n${d.stderr}`;
      throw e;
    } finally {
      await d.stopWithin(20_000);
    }
  });
}

/** Waits (without blocking the daemon, a separate process) for a back-end request. */
async function nextBackendRequest(fe: BlkFrontend, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const m = fe.takeBackendRequest();
    if (m !== null) return m;
    if (Date.now() > end) throw new Error("no message on the back-end channel");
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Runs a host command; returns its stdout, trimmed; throws with its stderr if it fails. */
async function command(cmd: string, args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b).trim();
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")}: ${text(out.stderr)}`);
  return text(out.stdout);
}

function capacityOf(fe: BlkFrontend): number {
  return decodeBlkConfig(fe.conn.getConfig(0, 60)).capacitySectors;
}

function pattern(bytes: number, seed: number): Uint8Array {
  return Uint8Array.from({ length: bytes }, (_, i) => (i * 13 + seed) & 0xff);
}

Deno.test("resize: a grown image is served and announced (vhostd resize, SIGHUP); a shrunk one is refused", async () => {
  await withDisk(async ({ d, socket, control, image }) => {
    const fe = await BlkFrontend.open({ socket, queues: 1, backendChannel: true });
    try {
      assert.ok(fe.hasProtocol(ProtocolFeature.BACKEND_REQ), "BACKEND_REQ negotiated");
      assert.equal(fe.config.capacitySectors, 64 * MiB / SECTOR);
      // Past the end is an I/O error before the resize.
      assert.equal(fe.blk.read(64 * MiB / SECTOR, 4096).status, BlkStatus.IOERR);

      // The command line, through the control socket.
      Deno.truncateSync(image, 96 * MiB);
      const r = await runVhostd(["resize", "--control", control]);
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^blk: grew from 64 MiB to 96 MiB; the front-end was told$/m);
      const m = await nextBackendRequest(fe);
      assert.equal(m.request, BackendRequest.CONFIG_CHANGE_MSG);
      assert.equal(m.flags, Flags.VERSION, "no NEED_REPLY: nothing waits for the front-end");
      assert.equal(m.size, 0);
      assert.equal(capacityOf(fe), 96 * MiB / SECTOR, "GET_CONFIG gives the new capacity");
      const at = 80 * MiB / SECTOR;
      assert.equal(
        fe.blk.write(at, pattern(8192, 3)).status,
        BlkStatus.OK,
        "write in the new part",
      );
      assert.deepEqual(fe.blk.read(at, 8192).data, pattern(8192, 3));
      const logged = (re: RegExp) => d.waitFor(() => re.test(d.stderr), 10_000, `${re}`);
      await logged(/capacity 64 MiB -> 96 MiB \(131072 -> 196608 sectors\)/);

      // SIGHUP: every device re-reads its size.
      Deno.truncateSync(image, 128 * MiB);
      Deno.kill(d.child.pid, "SIGHUP");
      assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
      assert.equal(capacityOf(fe), 128 * MiB / SECTOR);
      assert.ok(d.alive, "SIGHUP does not stop the daemon");

      // Nothing changed: nothing is announced.
      assert.deepEqual(await requestResize(control), {
        devices: [{ device: "blk", message: "size unchanged (128 MiB)" }],
      });
      // Shrinking is refused: the capacity stays, and the guest hears of nothing.
      Deno.truncateSync(image, 100 * MiB);
      assert.deepEqual(await requestResize(control, "blk"), {
        devices: [{ device: "blk", message: "shrinking from 128 MiB to 100 MiB refused" }],
      });
      await logged(/shrank from 128 MiB to 100 MiB: refused/);
      assert.equal(capacityOf(fe), 128 * MiB / SECTOR);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(fe.takeBackendRequest(), null, "no config change for a refused shrink");
      await assert.rejects(
        requestResize(control, "disk9"),
        /no device named "disk9" \(there are: blk\)/,
      );
    } finally {
      fe.close();
    }
  });
});

Deno.test("resize: under vhostd run, SIGHUP's reload refreshes the disks it keeps; resize takes --config and --device", async () => {
  await withDir("vhostd-resize-", async (dir) => {
    const image = `${dir}/disk0.img`;
    sparseFile(image, 64 * MiB);
    const config = `${dir}/vm.json`;
    Deno.writeTextFileSync(
      config,
      JSON.stringify({
        name: "vm1",
        socketDir: dir,
        devices: [{ type: "blk", id: "disk0", image, queues: 1 }],
      }),
    );
    const d = await DaemonProcess.start(["run", "--config", config]);
    try {
      const fe = await BlkFrontend.open({
        socket: `${dir}/disk0.sock`,
        queues: 1,
        backendChannel: true,
      });
      try {
        // The config is unchanged: the reload keeps disk0, connection and all, and refreshes it.
        Deno.truncateSync(image, 72 * MiB);
        Deno.kill(d.child.pid, "SIGHUP");
        assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
        assert.equal(capacityOf(fe), 72 * MiB / SECTOR);
        await d.waitFor(
          () => /reload: asking 1 device\(s\) to refresh/.test(d.stderr),
          10_000,
          "the reload's refresh line",
        );
        assert.match(d.stderr, /reloaded: 1 device\(s\) kept, 0 started, 0 stopped/);
        Deno.truncateSync(image, 80 * MiB);
        const r = await runVhostd(["resize", "--config", config, "--device", "disk0"]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stdout, "disk0: grew from 72 MiB to 80 MiB; the front-end was told\n");
        assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
        const bad = await runVhostd(["resize", "--config", config, "--device", "disk1"]);
        assert.equal(bad.code, 1);
        assert.match(bad.stderr, /no device named "disk1" \(there are: disk0\)/);
      } finally {
        fe.close();
      }
    } catch (e) {
      (e as Error).message += `\n--- vhostd stderr ---\n${d.stderr}`;
      throw e;
    } finally {
      await d.stopWithin(20_000);
    }
  });
});

Deno.test("resize: a read-only block device (a loop device) that grew is served at its new size", async () => {
  await withDir("vhostd-resize-", async (dir) => {
    const file = `${dir}/backing.img`;
    sparseFile(file, 32 * MiB);
    const loop = await command("losetup", ["-f", "--show", file]);
    try {
      const socket = `${dir}/disk.sock`;
      const control = `${dir}/control.sock`;
      const args = ["blk", "--socket", socket, "--image", loop, "--read-only", "--queues", "1"];
      const d = await DaemonProcess.start([...args, "--control", control]);
      try {
        const fe = await BlkFrontend.open({ socket, queues: 1, backendChannel: true });
        try {
          assert.equal(fe.config.capacitySectors, 32 * MiB / SECTOR);
          Deno.truncateSync(file, 48 * MiB);
          await command("losetup", ["-c", loop]); // the loop device takes its file's new size
          assert.deepEqual(await requestResize(control), {
            devices: [{
              device: "blk",
              message: "grew from 32 MiB to 48 MiB; the front-end was told",
            }],
          });
          assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
          assert.equal(capacityOf(fe), 48 * MiB / SECTOR);
          assert.equal(fe.blk.read(40 * MiB / SECTOR, 4096).status, BlkStatus.OK);
        } finally {
          fe.close();
        }
      } finally {
        await d.stopWithin(20_000);
      }
    } finally {
      await command("losetup", ["-d", loop]);
    }
  });
});

Deno.test("resize: a change while the device is stopped (which QEMU ignores) is announced again when it starts", async () => {
  await withDisk(async ({ control, image, socket }) => {
    // Connected and initialised, as QEMU is before the guest's driver starts the device.
    const fe = await BlkFrontend.connect({ socket, queues: 1, backendChannel: true });
    try {
      Deno.truncateSync(image, 80 * MiB);
      await requestResize(control);
      assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
      fe.start();
      assert.equal(
        (await nextBackendRequest(fe)).request,
        BackendRequest.CONFIG_CHANGE_MSG,
        "announced again once a ring runs",
      );
      assert.equal(capacityOf(fe), 80 * MiB / SECTOR);
      // Once seen by a running device, a stop and start do not repeat it.
      fe.stop();
      fe.start();
      assert.equal(fe.blk.read(80 * MiB / SECTOR - 8, 4096).status, BlkStatus.OK);
      await new Promise((r) => setTimeout(r, 200));
      assert.equal(fe.takeBackendRequest(), null);
    } finally {
      fe.close();
    }
  });
});

Deno.test("resize: a front-end that never reads its back-end channel gets one message however often the disk grows; I/O goes on", async () => {
  await withDisk(async ({ socket, control, image }) => {
    const fe = await BlkFrontend.open({ socket, queues: 1, backendChannel: true });
    try {
      const grows = 300;
      for (let i = 1; i <= grows; i++) {
        Deno.truncateSync(image, 64 * MiB + i * SECTOR);
        const { devices } = await requestResize(control);
        assert.match(devices[0].message, /^grew .* the front-end was told$/, `resize ${i}`);
        if (i % 50 === 0) {
          // The device serves while its channel holds an unread message.
          const at = 64 * MiB / SECTOR + i - 8;
          assert.equal(fe.blk.write(at, pattern(4096, i)).status, BlkStatus.OK);
          assert.deepEqual(fe.blk.read(at, 4096).data, pattern(4096, i));
        }
      }
      assert.equal(capacityOf(fe), 64 * MiB / SECTOR + grows);
      // One message waits: it makes the front-end read the config, which is the newest.
      assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
      assert.equal(fe.takeBackendRequest(), null, "the others were coalesced into it");
      // Read, the channel takes the next one.
      Deno.truncateSync(image, 65 * MiB);
      await requestResize(control);
      assert.equal((await nextBackendRequest(fe)).request, BackendRequest.CONFIG_CHANGE_MSG);
    } finally {
      fe.close();
    }
  });
});

Deno.test("resize: SET_BACKEND_REQ_FD with anything but a socket drops the front-end with one clear line; without BACKEND_REQ it is refused", async () => {
  await withDisk(async ({ d, socket }) => {
    let drops = 0;
    for (const kind of WRONG_KINDS.filter((k) => k !== "socket")) {
      const conn = await FrontendConnection.connect(socket, { retryMs: 5000 });
      const { fd, all } = wrongFd(kind);
      try {
        conn.ackMode = "all";
        conn.setProtocolFeatures(
          bit(ProtocolFeature.BACKEND_REQ) | bit(ProtocolFeature.REPLY_ACK),
        );
        assert.throws(() => conn.setBackendReqFd(fd), `a ${kind} is refused`);
        assert.ok(conn.waitClosed(), `a ${kind}: the connection is dropped`);
      } finally {
        conn.close();
        for (const f of all) closeQuietly(f);
      }
      drops++;
      const line = `${requestName(Request.SET_BACKEND_REQ_FD)}: the fd is a ${
        WRONG_KIND_SHOWN[kind]
      }, not a socket`;
      await d.waitFor(
        () =>
          d.stderr.split("\n").filter((l) => l.includes("dropping the front-end")).length === drops,
        10_000,
        `drop ${drops}`,
      );
      assert.ok(d.stderr.trimEnd().endsWith(line), `the last line names the ${kind}:\n${d.stderr}`);
    }
    // Not negotiated: a NACK, and the session goes on.
    const conn = await FrontendConnection.connect(socket, { retryMs: 5000 });
    const { fd, all } = wrongFd("socket");
    try {
      conn.ackMode = "all";
      conn.setProtocolFeatures(bit(ProtocolFeature.REPLY_ACK));
      assert.throws(() => conn.setBackendReqFd(fd), NackError);
      assert.ok(conn.getFeatures() !== 0n, "the connection still answers");
    } finally {
      conn.close();
      for (const f of all) closeQuietly(f);
    }
    // A good front-end is served after all that.
    const fe = await BlkFrontend.open({ socket, queues: 1, backendChannel: true });
    try {
      assert.equal(fe.blk.write(8, pattern(4096, 1)).status, BlkStatus.OK);
    } finally {
      fe.close();
    }
  });
});
