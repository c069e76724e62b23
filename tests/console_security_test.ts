/**
 * Who can reach a console, and what a guest or a client can make the daemon do, against real
 * `vhostd console` processes: attach sockets keep mode 0600 whatever the vhost-user socket's mode,
 * and another local user (uid 65534, through setpriv) can neither attach nor take QEMU's place on
 * a character-device socket unless allowed by uid; a TCP client needs the token; attach clients
 * are capped; running out of fds does not make the daemon spin; the log refuses symlinks, FIFOs
 * and hard links and is capped with one rotation; a guest flooding the control queue gets a
 * handful of log lines, not one per message.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd } from "./helpers/daemon.ts";
import { AttachClient, waitForFile, withConsole, writeTokenFile } from "./helpers/attach.ts";
import { connectScript, OTHER_UID, OtherUser } from "./helpers/other_user.ts";
import { ConsoleDriver } from "../vhost-user/frontend/console_driver.ts";
import { ControlEvent } from "../devices/console/mod.ts";

const enc = new TextEncoder();
/** The documented default of `--attach-max-clients`. */
const DEFAULT_MAX_CLIENTS = 16;
/** A group the daemon's sockets are given to (QEMU's group on a real host); nobody else has it. */
const QEMU_GID = 4242;

function mode(path: string): { mode: number; uid: number; gid: number } {
  const info = Deno.statSync(path);
  return { mode: info.mode! & 0o777, uid: info.uid!, gid: info.gid! };
}

/** What the other user's {@link connectScript} received. */
function received(u: OtherUser): string {
  const m = /^received (.*)$/m.exec(u.stdout);
  assert.ok(m, `the other user's script did not finish:\n${u.stdout}\n${u.stderr}`);
  return JSON.parse(m[1]);
}

Deno.test("console: attach sockets stay 0600 under --socket-mode 0660; QEMU's group cannot type in", async () => {
  await withConsole(
    () => ["--name", "agent", "--socket-mode", "0660", "--socket-group", String(QEMU_GID)],
    async ({ sock }) => {
      assert.deepEqual(mode(sock), { mode: 0o660, uid: 0, gid: QEMU_GID }, "the vhost-user socket");
      for (const name of ["console", "agent"]) {
        assert.deepEqual(mode(`${sock}.${name}`), { mode: 0o600, uid: 0, gid: 0 }, name);
      }
      const driver = await ConsoleDriver.connect(sock, { ports: 2 });
      try {
        driver.handshake(2);
        driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
        // A member of QEMU's group (as QEMU itself is) tries to type into the console.
        const r = await OtherUser.run(connectScript(`${sock}.console`, "rm -rf /\n"), [QEMU_GID]);
        assert.match(r.stdout, /^refused PermissionDenied$/m, r.stdout + r.stderr);
        assert.equal(driver.rxPending(0, 300), false, "nothing reached the guest");
      } finally {
        driver.close();
      }
    },
  );
});

Deno.test("console: a widened attach socket still admits only vhostd's uid, root and --attach-allow-uid", async () => {
  const guestSays = "login: secret-banner\r\n";
  // Mode 0666: the file lets everyone in; SO_PEERCRED still turns the other user away.
  await withConsole(() => ["--chardev", "--attach-mode", "0666"], async ({ sock }) => {
    assert.equal(mode(`${sock}.console`).mode, 0o666);
    const qemu = await AttachClient.connect(sock);
    try {
      await qemu.send(guestSays);
      await waitForFile(`${sock}.console.log`, guestSays);
      const u = OtherUser.spawn(connectScript(`${sock}.console`, "typed by another user\n"));
      assert.equal(await u.exit(), 0, u.stderr);
      const got = received(u);
      assert.match(got, /^vhostd: uid 65534 is not allowed to connect\r\n$/, got);
      assert.ok(!got.includes("secret-banner"), "no scrollback for a refused client");
      // The daemon's own user still attaches; the refused client's bytes never reached QEMU.
      const me = await AttachClient.connect(`${sock}.console`);
      await me.waitFor(guestSays, 10_000);
      await me.send("mine\n");
      await qemu.waitFor("mine\n", 10_000);
      assert.ok(!qemu.text.includes("another user"), qemu.text);
      await me.close();
    } finally {
      await qemu.close();
    }
  });
  // Allowed by uid, with the group that opens the file.
  await withConsole(
    () => [
      ...["--chardev", "--attach-mode", "0660", "--attach-group", String(QEMU_GID)],
      ...["--attach-allow-uid", `1,${OTHER_UID}`],
    ],
    async ({ sock }) => {
      assert.deepEqual(mode(`${sock}.console`), { mode: 0o660, uid: 0, gid: QEMU_GID });
      const qemu = await AttachClient.connect(sock);
      try {
        await qemu.send(guestSays);
        await waitForFile(`${sock}.console.log`, guestSays);
        const u = OtherUser.spawn(connectScript(`${sock}.console`, "allowed input\n"), [QEMU_GID]);
        await qemu.waitFor("allowed input\n", 30_000);
        assert.equal(await u.exit(), 0, u.stderr);
        assert.equal(received(u), guestSays);
      } finally {
        await qemu.close();
      }
    },
  );
});

Deno.test("console --chardev: another user cannot take QEMU's place and read what is typed", async () => {
  // Mode 0666 on the chardev socket, as a too-wide umask or mode would leave it.
  await withConsole(() => ["--chardev", "--socket-mode", "0666"], async ({ sock }) => {
    const u = OtherUser.spawn(connectScript(sock, "fake guest output\r\n", 4000));
    await u.waitFor("connected");
    const operator = await AttachClient.connect(`${sock}.console`);
    let qemu: AttachClient | null = null;
    try {
      await operator.send("hunter2\n");
      // The real QEMU (the daemon's own user here) connects and gets what was typed.
      qemu = await AttachClient.connect(sock);
      await qemu.waitFor("hunter2\n", 10_000);
      assert.equal(await u.exit(), 0, u.stderr);
      const got = received(u);
      assert.ok(!got.includes("hunter2"), `the other user read the password: ${got}`);
      assert.match(got, /uid 65534 is not allowed to connect/);
      assert.ok(!operator.text.includes("fake guest output"), operator.text);
    } finally {
      await qemu?.close();
      await operator.close();
    }
  });
  // --allow-uid names QEMU's uid when it is not the daemon's.
  await withConsole(
    () => ["--chardev", "--socket-mode", "0666", "--allow-uid", String(OTHER_UID)],
    async ({ sock }) => {
      const u = OtherUser.spawn(connectScript(sock, "", 4000));
      await u.waitFor("connected");
      const operator = await AttachClient.connect(`${sock}.console`);
      try {
        await operator.send("for the allowed qemu\n");
        assert.equal(await u.exit(), 0, u.stderr);
        assert.equal(received(u), "for the allowed qemu\n");
      } finally {
        await operator.close();
      }
    },
  );
});

Deno.test("console attach tcp: the token comes first; a wrong one, or none in time, gets nothing", async () => {
  let token = "";
  await withConsole(
    (sock) => {
      token = writeTokenFile(`${sock}.token`);
      return ["--chardev", "--attach", "tcp:0", "--attach-token-file", `${sock}.token`];
    },
    async ({ sock, d }) => {
      const port = Number(/attach tcp 127\.0\.0\.1:(\d+),/.exec(d.stdout)?.[1]);
      assert.ok(port > 0, d.stdout);
      const qemu = await AttachClient.connect(sock);
      const clients: AttachClient[] = [];
      try {
        await qemu.send("boot secret\r\n");
        await waitForFile(`${sock}.console.log`, "boot secret\r\n");
        const silent = await AttachClient.connectTcp(port, null);
        clients.push(silent);
        const wrong = await AttachClient.connectTcp(port, "x".repeat(token.length));
        clients.push(wrong);
        await wrong.waitFor("vhostd: wrong token\r\n", 10_000);
        const tooLong = await AttachClient.connectTcp(port, null);
        clients.push(tooLong);
        await tooLong.send("y".repeat(4096));
        await tooLong.waitFor("vhostd: wrong token\r\n", 10_000);
        const right = await AttachClient.connectTcp(port, token);
        clients.push(right);
        await right.waitFor("boot secret\r\n", 10_000);
        await right.send("after the token\n");
        await qemu.waitFor("after the token\n", 10_000);
        // A client that sends nothing is dropped once its 10 s are up, at the next connection.
        await new Promise((r) => setTimeout(r, 10_500));
        clients.push(await AttachClient.connectTcp(port, token));
        await silent.waitFor("vhostd: no token in time\r\n", 10_000);
        await new Promise((r) => setTimeout(r, 200));
        for (const c of [wrong, tooLong, silent]) assert.ok(!c.text.includes("boot"), c.text);
        assert.ok(wrong.closed && tooLong.closed && silent.closed, "refused clients are closed");
        assert.ok(!qemu.text.includes("xxxx") && !qemu.text.includes("yyyy"), qemu.text);
      } finally {
        for (const c of clients) await c.close();
        await qemu.close();
      }
    },
  );
});

Deno.test("console attach tcp: no token file, or a bad one, is one usage error", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-console-" });
  try {
    const tcp = ["console", "--socket", `${dir}/con.sock`, "--attach", "tcp:0"];
    Deno.writeTextFileSync(`${dir}/open.token`, "a".repeat(32), { mode: 0o644 });
    Deno.chmodSync(`${dir}/open.token`, 0o644);
    Deno.writeTextFileSync(`${dir}/short.token`, "short\n", { mode: 0o600 });
    const cases: [string[], RegExp][] = [
      [[], /--attach tcp:0 needs a token .*--attach-token-file FILE/],
      [["--attach-token-file", `${dir}/none`], /--attach-token-file .*none: file not found/],
      [["--attach-token-file", `${dir}/open.token`], /open to every user \(mode 0644\)/],
      [["--attach-token-file", `${dir}/short.token`], /16 to 256 bytes, not 5/],
    ];
    for (const [args, want] of cases) {
      // A daemon that starts instead is stopped after 30 s and fails the test.
      const r = await runVhostd([...tcp, ...args], 30_000);
      assert.equal(r.code, 2, r.stderr);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, want);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("console: attach clients are capped per port; the one too many is told so", async () => {
  await withConsole(() => ["--chardev"], async ({ sock }) => {
    const qemu = await AttachClient.connect(sock);
    const clients: AttachClient[] = [];
    try {
      await qemu.send("hello\r\n");
      await waitForFile(`${sock}.console.log`, "hello\r\n");
      for (let i = 0; i < DEFAULT_MAX_CLIENTS; i++) {
        clients.push(await AttachClient.connect(`${sock}.console`));
        await clients[i].waitFor("hello\r\n", 10_000);
      }
      const extra = await AttachClient.connect(`${sock}.console`);
      await extra.waitFor(`vhostd: port console has ${DEFAULT_MAX_CLIENTS} clients attached`);
      await qemu.send("live\r\n");
      for (const c of clients) await c.waitFor("hello\r\nlive\r\n", 10_000);
      assert.ok(!extra.text.includes("hello"), extra.text);
      await extra.close();
      // One leaves: there is room again.
      await clients.pop()!.close();
      let again: AttachClient | null = null;
      for (let tries = 0; tries < 50 && again === null; tries++) {
        const c = await AttachClient.connect(`${sock}.console`);
        await new Promise((r) => setTimeout(r, 100));
        if (c.text.includes("hello")) again = c;
        else await c.close();
      }
      assert.ok(again, "a client gets in once another left");
      clients.push(again);
    } finally {
      for (const c of clients) await c.close();
      await qemu.close();
    }
  });
});

Deno.test("console: out of fds, the attach socket backs off instead of spinning, and recovers", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-console-" });
  const sock = `${dir}/con.sock`;
  // The daemon needs under 40 fds of its own: 50 runs out before the cap of 16 clients is met.
  const d = DaemonProcess.spawnUnder(["prlimit", "--nofile=50:50", "--"], [
    ...["run", "-A", new URL("../daemon/main.ts", import.meta.url).pathname],
    ...["console", "--chardev", "--socket", sock],
  ]);
  const clients: AttachClient[] = [];
  let qemu: AttachClient | null = null;
  try {
    qemu = await AttachClient.connect(sock, 30_000);
    await qemu.send("ready\r\n");
    await waitForFile(`${sock}.console.log`, "ready\r\n", 30_000);
    // Attach until one is left waiting in the backlog: the daemon is out of fds.
    let waiting: AttachClient | null = null;
    while (waiting === null) {
      assert.ok(clients.length < DEFAULT_MAX_CLIENTS, "the daemon never ran out of fds");
      const c = await AttachClient.connect(`${sock}.console`);
      try {
        await c.waitFor("ready\r\n", 3000);
        clients.push(c);
      } catch {
        waiting = c;
      }
    }
    // Count the daemon's accept calls for 2 s: a spinning loop makes hundreds of thousands.
    const trace = `${dir}/accept.trace`;
    const strace = new Deno.Command("strace", {
      args: ["-f", "-p", String(d.child.pid), "-e", "trace=accept4", "-o", trace],
      stdout: "null",
      stderr: "null",
    }).spawn();
    await new Promise((r) => setTimeout(r, 2000));
    strace.kill("SIGINT");
    await strace.status;
    const calls = Deno.readTextFileSync(trace).split("\n").filter((l) => l.includes("accept4("));
    assert.ok(calls.length < 100, `${calls.length} accept calls in 2 s:\n${calls.slice(0, 5)}`);
    assert.match(d.stderr, /cannot accept on the attach socket of port 0: EMFILE; trying again/);
    // Room again: the waiting client gets in.
    for (const c of clients.splice(0, 4)) await c.close();
    await waiting.waitFor("ready\r\n", 10_000);
    clients.push(waiting);
    await qemu.send("still serving\r\n");
    await waiting.waitFor("still serving\r\n", 10_000);
  } finally {
    for (const c of clients) await c.close();
    await qemu?.close();
    const code = await d.stop();
    await Deno.remove(dir, { recursive: true });
    assert.equal(code, 0, d.stderr);
  }
});

Deno.test("console --log: a symlink, a hard link or a FIFO is refused at once, and nothing is written", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-console-" });
  try {
    const victim = `${dir}/victim`;
    Deno.writeTextFileSync(victim, "precious\n");
    Deno.symlinkSync(victim, `${dir}/link.log`);
    Deno.linkSync(victim, `${dir}/hard.log`);
    await new Deno.Command("mkfifo", { args: [`${dir}/fifo.log`] }).output();
    const cases: [string, RegExp][] = [
      ["link.log", /link\.log is a symbolic link; refusing to follow it/],
      ["hard.log", /hard\.log is a file with other hard links; refusing/],
      ["fifo.log", /fifo\.log is not a regular file/],
    ];
    for (const [log, want] of cases) {
      // Opening a FIFO for writing would wait for a reader for ever: a daemon still there after
      // 30 s is stopped, and fails the test.
      const r = await runVhostd(
        ["console", "--socket", `${dir}/con.sock`, "--log", `${dir}/${log}`],
        30_000,
      );
      assert.equal(r.code, 2, `${log}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, want);
    }
    assert.equal(Deno.readTextFileSync(victim), "precious\n");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("console --log-max-size: the log is rotated to FILE.1 and never grows past the cap", async () => {
  const cap = 64 * 1024;
  await withConsole(
    (sock) => ["--chardev", "--log", `${sock}.log`, "--log-max-size", String(cap)],
    async ({ sock, d }) => {
      const qemu = await AttachClient.connect(sock);
      try {
        // 320 KiB of numbered lines: five times the cap.
        const line = (i: number) => `line ${String(i).padStart(6, "0")} ${"x".repeat(48)}\r\n`;
        const lines = Array.from({ length: 5 * 1024 + 100 }, (_, i) => line(i));
        const text = lines.join("");
        for (let off = 0; off < text.length; off += 16384) {
          await qemu.send(text.slice(off, off + 16384));
        }
        await waitForFile(`${sock}.log`, lines.at(-1)!, 30_000);
        const now = Deno.readTextFileSync(`${sock}.log`);
        const before = Deno.readTextFileSync(`${sock}.log.1`);
        assert.ok(now.length <= cap, `${now.length} bytes in the log`);
        assert.ok(before.length <= cap && before.length > cap / 2, `${before.length} in .1`);
        // The two files hold the most recent output, in order, without a gap between them.
        assert.ok(text.endsWith(before + now), "FILE.1 then FILE are the latest output");
        assert.equal(
          [...Deno.readDirSync(`${sock.slice(0, sock.lastIndexOf("/"))}`)].filter((e) =>
            e.name.startsWith("con.sock.log")
          ).length,
          2,
          "one rotation is kept",
        );
        // The rotations (five) are logged, at most ten lines at once.
        const rotations = d.stderr.split("\n").filter((l) => l.includes("a new log started"));
        assert.ok(rotations.length >= 1 && rotations.length <= 10, d.stderr);
      } finally {
        await qemu.close();
      }
    },
  );
});

Deno.test("console: a guest flooding the control queue gets a few log lines, not one per message", async () => {
  let daemon: DaemonProcess | null = null;
  await withConsole(() => ["--name", "agent"], async ({ sock, d }) => {
    daemon = d;
    const driver = await ConsoleDriver.connect(sock, { ports: 2 });
    try {
      driver.handshake(2);
      for (let i = 0; i < 300; i++) {
        driver.sendControl(0, 99, 1); // an event no driver sends
        driver.sendControl(7, ControlEvent.PORT_OPEN, 1); // a port that does not exist
        driver.sendControl(1, ControlEvent.PORT_OPEN, i % 2); // the agent port, open, closed...
      }
      driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
      driver.write(0, enc.encode("after the flood\r\n"));
      await waitForFile(`${sock}.console.log`, "after the flood\r\n");
      // The device still serves the guest.
      const client = await AttachClient.connect(`${sock}.console`);
      await client.send("still here\n");
      assert.equal(driver.readUntil(0, "still here\n", 10_000), "still here\n");
      await client.close();
    } finally {
      driver.close();
    }
  });
  // The daemon has stopped: all it logged has been read.
  const lines = daemon!.stderr.split("\n");
  const count = (re: RegExp) => lines.filter((l) => re.test(l)).length;
  const stderr = daemon!.stderr;
  assert.ok(count(/ignoring control event 99/) <= 10, stderr);
  assert.ok(count(/control event 6 for unknown port 7/) <= 10, stderr);
  assert.ok(count(/guest (opened|closed) port 1/) <= 10, stderr);
  assert.ok(count(/ignoring control event 99/) >= 1, "the first lines still come");
});

Deno.test("console: bad values of the access and log settings are one error naming the flag or field", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-console-" });
  try {
    const con = ["console", "--socket", `${dir}/con.sock`];
    const flags: [string[], RegExp][] = [
      [["--attach-mode", "0999"], /--attach-mode must be octal like 0660, not "0999"/],
      [["--attach-group", "no-such-group"], /--attach-group: no group named "no-such-group"/],
      [["--attach-allow-uid", "root"], /--attach-allow-uid takes numeric uids, not "root"/],
      [["--attach-max-clients", "0"], /--attach-max-clients must be a whole number from 1 to 1024/],
      [["--log-max-size", "4096"], /--log-max-size must be 0 \(never rotate\) or at least 65536/],
      [["--metrics", "0.0.0.0:0"], /--metrics 0\.0\.0\.0:0 would serve metrics without auth/],
    ];
    for (const [args, want] of flags) {
      const r = await runVhostd([...con, ...args], 30_000);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, want);
    }
    const config = `${dir}/vm.json`;
    const fields: [Record<string, unknown>, RegExp][] = [
      [{ attachMode: "rw" }, /^vhostd run: devices\[0\]\.attachMode must be octal/],
      [{ attachGroup: "no-such-group" }, /devices\[0\]\.attachGroup: no group named/],
      [{ attachAllowUids: [-1] }, /devices\[0\]\.attachAllowUids\[0\]: must be a numeric uid/],
      [{ attachMaxClients: 5000 }, /devices\[0\]\.attachMaxClients: must be a whole number/],
      [{ logMaxSize: 1 }, /devices\[0\]\.logMaxSize: must be 0 \(never rotate\) or at least/],
      [{ attachTokenFile: `${dir}/none` }, /devices\[0\]\.attachTokenFile: .*file not found/],
    ];
    for (const [extra, want] of fields) {
      Deno.writeTextFileSync(
        config,
        JSON.stringify({ socketDir: dir, devices: [{ type: "console", id: "con", ...extra }] }),
      );
      const r = await runVhostd(["run", "--config", config, "--check"], 30_000);
      assert.equal(r.code, 2, `${JSON.stringify(extra)}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, want);
      assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["vm.json"], "nothing left");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
