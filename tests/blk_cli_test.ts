/**
 * The `vhostd blk` and `vhostd start` command lines as a user meets them: bad input gets one clear
 * line and exit code 2; a good start listens, prints the QEMU arguments, and stops cleanly.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";

/** Asserts exit code 2 and exactly one line on stderr matching `message`. */
async function assertUsageError(args: string[], message: RegExp): Promise<void> {
  const r = await runVhostd(args);
  assert.equal(r.code, 2, `exit code for ${args.join(" ")}\n${r.stderr}`);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line expected, got:\n${r.stderr}`);
  assert.match(lines[0], message);
}

Deno.test("blk: a missing image is one line and exit 2", () =>
  withDir("vhostd-cli-", async (dir) => {
    await assertUsageError(
      ["blk", "--socket", `${dir}/s.sock`, "--image", `${dir}/nope.img`],
      /^vhostd blk: image not found: .*nope\.img$/,
    );
  }));

Deno.test("blk: an unknown flag is one line and exit 2", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    await assertUsageError(
      ["blk", "--socket", `${dir}/s.sock`, "--image", `${dir}/d.img`, "--bogus"],
      /Unknown option '--bogus'/,
    );
  }));

Deno.test("blk: missing --socket and bad --queues are usage errors", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    await assertUsageError(["blk", "--image", `${dir}/d.img`], /needs --socket/);
    await assertUsageError(
      ["blk", "--socket", `${dir}/s.sock`, "--image", `${dir}/d.img`, "--queues", "0"],
      /--queues must be a whole number from 1 to 64/,
    );
    await assertUsageError(
      ["blk", "--socket", `${dir}/s.sock`, "--image", `${dir}/d.img`, "--poll-us", "5000"],
      /--poll-us must be a whole number from 0 to 1000/,
    );
  }));

Deno.test("blk: a read-only image opened writable is refused, and served with --read-only", () =>
  withDir("vhostd-cli-", async (dir) => {
    const img = `${dir}/ro.img`;
    sparseFile(img, 1 << 20);
    Deno.chmodSync(img, 0o444);
    await assertUsageError(
      ["blk", "--socket", `${dir}/s.sock`, "--image", img],
      /is read-only .*pass --read-only/,
    );
    const d = await DaemonProcess.start([
      "blk",
      "--socket",
      `${dir}/s.sock`,
      "--image",
      img,
      "--read-only",
    ]);
    assert.match(d.stdout, /read-only/);
    assert.equal(await d.stop(), 0);
  }));

Deno.test("blk: a socket in use by a live listener is never taken over", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const sock = `${dir}/s.sock`;
    const first = await DaemonProcess.start(["blk", "--socket", sock, "--image", `${dir}/d.img`]);
    try {
      await assertUsageError(
        ["blk", "--socket", sock, "--image", `${dir}/d.img`],
        /socket .*s\.sock is in use by a running back-end/,
      );
      assert.ok(Deno.lstatSync(sock).isSocket, "the first daemon's socket is still there");
    } finally {
      assert.equal(await first.stop(), 0);
    }
  }));

Deno.test("blk: a stale socket is replaced; a regular file in the way is not", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const sock = `${dir}/s.sock`;
    // A daemon killed with SIGKILL leaves a stale socket behind.
    const killed = await DaemonProcess.start(["blk", "--socket", sock, "--image", `${dir}/d.img`]);
    await killed.stop("SIGKILL");
    assert.ok(Deno.lstatSync(sock).isSocket);
    const d = await DaemonProcess.start(["blk", "--socket", sock, "--image", `${dir}/d.img`]);
    assert.equal(await d.stop(), 0);

    Deno.writeTextFileSync(`${dir}/file`, "precious");
    await assertUsageError(
      ["blk", "--socket", `${dir}/file`, "--image", `${dir}/d.img`],
      /exists and is not a socket/,
    );
    assert.equal(Deno.readTextFileSync(`${dir}/file`), "precious");
  }));

Deno.test("blk: SIGTERM and SIGINT stop cleanly, remove the socket, exit 0; socket is 0600", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    for (const sig of ["SIGTERM", "SIGINT"] as const) {
      const sock = `${dir}/${sig}.sock`;
      const d = await DaemonProcess.start(["blk", "--socket", sock, "--image", `${dir}/d.img`]);
      assert.equal(Deno.lstatSync(sock).mode! & 0o777, 0o600);
      // The printed line names the queues: QEMU would otherwise ask for one per vCPU.
      assert.match(d.stdout, /-device vhost-user-blk-pci,chardev=vhostd0,num-queues=16 /);
      assert.match(d.stdout, /memory-backend-memfd,id=mem,size=1G,share=on/);
      assert.equal(await d.stop(sig), 0, d.stderr);
      assert.throws(() => Deno.lstatSync(sock), Deno.errors.NotFound);
    }
  }));

Deno.test("start: serves a sparse 1 GiB image in its own folder", () =>
  withDir("vhostd-cli-", async (dir) => {
    const d = await DaemonProcess.start(["start"], { XDG_STATE_HOME: dir }, true);
    try {
      const img = `${dir}/vhostd/default/disk.img`;
      const info = Deno.statSync(img);
      assert.equal(info.size, 1 << 30);
      assert.ok(info.blocks! * 512 < 1 << 20, "sparse");
      assert.ok(Deno.lstatSync(`${dir}/vhostd/default/blk.sock`).isSocket);
      assert.match(d.stdout, /1024 MiB, read-write/);
      assert.match(d.stdout, /-device vhost-user-blk-pci,chardev=vhostd0,num-queues=16 /);
    } finally {
      assert.equal(await d.stop(), 0);
    }
  }));

Deno.test("help: every command has --help with an example or a description", async () => {
  for (const args of [["help"], ["blk", "--help"], ["start", "--help"]]) {
    const r = await runVhostd(args);
    assert.equal(r.code, 0, args.join(" "));
    assert.match(r.stdout, /Usage:/);
  }
  const none = await runVhostd([]);
  assert.equal(none.code, 2);
  const unknown = await runVhostd(["frobnicate"]);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command "frobnicate"/);
});

Deno.test("blk: --socket-group and --socket-mode widen the socket; --allow-uid refuses others", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const sock = `${dir}/g.sock`;
    const d = await DaemonProcess.start([
      "blk",
      "--socket",
      sock,
      "--image",
      `${dir}/d.img`,
      "--socket-mode",
      "0660",
      "--socket-group",
      "1234",
      "--allow-uid",
      "4321",
    ]);
    try {
      const st = Deno.lstatSync(sock);
      assert.equal(st.mode! & 0o777, 0o660);
      assert.equal(st.gid, 1234);
      // We connect as root (uid 0), which is not allowed: the daemon logs and closes.
      const conn = await Deno.connect({ transport: "unix", path: sock });
      const n = await conn.read(new Uint8Array(1));
      conn.close();
      assert.equal(n, null, "connection closed by the daemon");
      await d.waitFor(
        () => /refusing front-end pid \d+ uid 0: uid not allowed/.test(d.stderr),
        5000,
        "refusal",
      );
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
    await assertUsageError(
      ["blk", "--socket", sock, "--image", `${dir}/d.img`, "--socket-group", "no-such-group"],
      /no group named "no-such-group"/,
    );
  }));

Deno.test("blk: a second signal during a slow shutdown exits at once, socket removed", () =>
  withDir("vhostd-cli-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const sock = `${dir}/slow.sock`;
    const d = await DaemonProcess.start(
      ["blk", "--socket", sock, "--image", `${dir}/d.img`],
      { VHOSTD_FAULT_SLOW_SHUTDOWN_MS: "20000" },
    );
    d.child.kill("SIGTERM");
    await d.waitFor(() => d.stderr.includes("SIGTERM: finishing"), 5000, "the first signal");
    await new Promise((r) => setTimeout(r, 500));
    const t0 = Date.now();
    d.child.kill("SIGTERM");
    const code = await d.exit();
    assert.ok(Date.now() - t0 < 3000, "exited at once");
    assert.equal(code, 1);
    assert.match(d.stderr, /second SIGTERM: exiting now/);
    assert.throws(() => Deno.lstatSync(sock), Deno.errors.NotFound);
  }));
