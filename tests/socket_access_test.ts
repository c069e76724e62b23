/**
 * Every socket vhostd creates exists only with its final mode and group, and creating it follows
 * no symlink: a real daemon runs under umask 000 with every chmod slowed down by strace (the
 * window a loaded machine might give), while another local user (uid 65534, through setpriv)
 * watches the world-writable socket folder, connects to each socket the moment it appears and
 * swaps one for a symlink to a file of root's. Also: metrics are served on loopback only unless
 * the operator says otherwise.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile } from "./helpers/daemon.ts";
import { OtherUser } from "./helpers/other_user.ts";

const MAIN = new URL("../daemon/main.ts", import.meta.url).pathname;
/** A group the vhost-user socket is given to (QEMU's group); the other user does not have it. */
const QEMU_GID = 4242;

/**
 * The other user's watcher: waits for each path to appear, tries to connect to it, and turns the
 * one named `swap` into a symlink to `victim`; prints a JSON list of what happened.
 */
function watcherScript(paths: Record<string, string>, swap: string, victim: string): string {
  return `
    const paths = ${JSON.stringify(paths)};
    const seen = new Set();
    const out = [];
    const end = Date.now() + 45_000;
    console.log("watching");
    while (seen.size < Object.keys(paths).length && Date.now() < end) {
      for (const [name, path] of Object.entries(paths)) {
        if (seen.has(name)) continue;
        try {
          if (!Deno.lstatSync(path).isSocket) continue;
        } catch {
          continue;
        }
        seen.add(name);
        try {
          (await Deno.connect({ transport: "unix", path })).close();
          out.push(name + " connected");
        } catch (e) {
          out.push(name + " " + e.name);
        }
        if (name === ${JSON.stringify(swap)}) {
          try {
            Deno.renameSync(path, path + ".moved");
            Deno.symlinkSync(${JSON.stringify(victim)}, path);
            out.push(name + " swapped");
          } catch (e) {
            out.push(name + " not swapped: " + e.name);
          }
        }
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    console.log("result " + JSON.stringify(out));
  `;
}

Deno.test("sockets appear with their final mode: no connect in the window, no chmod through a symlink", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-sockets-" });
  const safe = await Deno.makeTempDir({ prefix: "vhostd-victim-" });
  Deno.chmodSync(dir, 0o777); // a run directory too widely open, but not sticky
  const victim = `${safe}/victim`;
  Deno.writeTextFileSync(victim, "root's file\n");
  Deno.chmodSync(victim, 0o600);
  const sock = `${dir}/con.sock`;
  const paths = { console: `${sock}.console`, control: `${dir}/ctl.sock`, device: sock };
  const watcher = OtherUser.spawn(watcherScript(paths, "device", victim));
  await watcher.waitFor("watching");
  // umask 000, and every chmod waits 1.5 s first: a chmod after bind leaves the socket at 0777.
  const d = DaemonProcess.spawnUnder(
    [
      ...["sh", "-c", 'umask 000; exec "$@"', "sh"],
      ...["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=chmod,fchmodat"],
      ...["-e", "inject=chmod,fchmodat:delay_enter=1500000", "--"],
    ],
    [
      ...["run", "-A", MAIN, "console", "--socket", sock, "--control", paths.control],
      ...["--socket-mode", "0660", "--socket-group", String(QEMU_GID)],
    ],
  );
  try {
    await d.waitFor(() => d.stdout.includes("vhostd: serving"), 60_000, "the start banner");
    await watcher.waitFor("result", 60_000);
    const result = JSON.parse(/^result (.*)$/m.exec(watcher.stdout)![1]) as string[];
    assert.deepEqual(result.filter((r) => r.includes("connected")), [], watcher.stdout);
    assert.ok(result.includes("console PermissionDenied"), watcher.stdout);
    assert.ok(result.includes("control PermissionDenied"), watcher.stdout);
    assert.ok(result.includes("device PermissionDenied"), watcher.stdout);
    const info = Deno.statSync(victim);
    assert.deepEqual([info.mode! & 0o777, info.gid], [0o600, 0], "the victim is untouched");
    assert.equal(Deno.readTextFileSync(victim), "root's file\n");
  } finally {
    await d.stop();
    await watcher.exit();
    await Deno.remove(dir, { recursive: true });
    await Deno.remove(safe, { recursive: true });
  }
});

Deno.test("sockets keep their mode and group whatever the umask, and a long path still binds", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-sockets-" });
  // 107 bytes: the longest path a socket address holds.
  const deep = `${dir}/${"d".repeat(107 - dir.length - 12)}`;
  Deno.mkdirSync(deep);
  const sock = `${deep}/disk.sock.x`.slice(0, 107);
  sparseFile(`${dir}/disk.img`, 1 << 20);
  const d = DaemonProcess.spawnUnder(["sh", "-c", 'umask 077; exec "$@"', "sh"], [
    ...["run", "-A", MAIN, "blk", "--socket", sock, "--image", `${dir}/disk.img`],
    ...["--socket-mode", "0660", "--socket-group", String(QEMU_GID)],
  ]);
  try {
    await d.waitFor(() => d.stdout.includes("vhostd: serving"), 30_000, "the start banner");
    assert.equal(new TextEncoder().encode(sock).length, 107);
    const info = Deno.lstatSync(sock);
    assert.ok(info.isSocket);
    assert.deepEqual([info.mode! & 0o777, info.gid], [0o660, QEMU_GID]);
    // Nothing else is left in the folder: the private directory is gone.
    assert.deepEqual([...Deno.readDirSync(deep)].map((e) => e.name), [sock.slice(deep.length + 1)]);
  } finally {
    assert.equal(await d.stop(), 0, d.stderr);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("--metrics: a non-loopback address is refused unless allowed; allowed, it says so", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-metrics-" });
  try {
    sparseFile(`${dir}/disk.img`, 1 << 20);
    const blk = ["blk", "--socket", `${dir}/disk.sock`, "--image", `${dir}/disk.img`];
    for (const addr of ["0.0.0.0:0", "[::]:0", "192.0.2.1:61910", "metrics.example:61910"]) {
      // A daemon that starts instead is stopped after 30 s and fails the test.
      const r = await runVhostd([...blk, "--metrics", addr], 30_000);
      assert.equal(r.code, 2, `${addr}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, /without authentication.*--metrics-any-address/);
    }
    const alone = await runVhostd([...blk, "--metrics-any-address"], 30_000);
    assert.equal(alone.code, 2, alone.stderr);
    assert.match(alone.stderr, /--metrics-any-address goes with --metrics ADDR/);

    const config = `${dir}/vm.json`;
    const vm = (extra: Record<string, unknown>) =>
      Deno.writeTextFileSync(
        config,
        JSON.stringify({
          socketDir: dir,
          devices: [{ type: "blk", image: `${dir}/disk.img` }],
          ...extra,
        }),
      );
    vm({ metrics: "0.0.0.0:61910" });
    const r = await runVhostd(["run", "--config", config, "--check"], 30_000);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /^vhostd run: metrics: 0\.0\.0\.0:61910 .*"metricsAnyAddress": true/);
    vm({ metrics: "0.0.0.0:61910", metricsAnyAddress: true });
    assert.equal((await runVhostd(["run", "--config", config, "--check"], 30_000)).code, 0);

    // Allowed: served (the test only scrapes it over loopback), with a warning.
    const d = await DaemonProcess.start([
      ...blk,
      "--metrics",
      "0.0.0.0:0",
      "--metrics-any-address",
    ]);
    try {
      await d.waitFor(() => /unauthenticated/.test(d.stderr), 30_000, "the warning");
      assert.match(d.stderr, /metrics on 0\.0\.0\.0 are served to every host that reaches it/);
      const port = Number(/metrics on http:\/\/0\.0\.0\.0:(\d+)\/metrics/.exec(d.stderr)?.[1]);
      const res = await fetch(`http://127.0.0.1:${port}/metrics`);
      assert.match(await res.text(), /vhostd_device_up\{vm="blk",device="blk"/);
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
