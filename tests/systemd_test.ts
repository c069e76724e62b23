/**
 * Running under systemd, as far as this machine allows without systemd as PID 1: the template
 * unit passes `systemd-analyze verify`, and the daemon speaks sd_notify the way `Type=notify`
 * and `WatchdogSec=` expect: READY=1 only once every socket serves, STATUS= lines, WATCHDOG=1
 * pings, STOPPING=1 on SIGTERM; and it serves the sockets socket activation passes it
 * (`systemd-socket-activate`, which passes them as systemd does).
 */

import assert from "node:assert/strict";
import { daemonFile, DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { NotifySocket } from "./helpers/notify_socket.ts";
import { FrontendConnection } from "../vhost-user/frontend/connection.ts";
import { requestStatus } from "../daemon/control.ts";
import { sendDatagram } from "../sys/socket.ts";

const MiB = 1 << 20;
const UNIT_DIR = new URL("../examples/systemd/", import.meta.url).pathname;

/** The README's install command (its "Install" section), as an argument list. */
function readmeInstallCommand(): string[] {
  const readme = Deno.readTextFileSync(daemonFile("README.md"));
  const line = readme.split("\n").find((l) => l.startsWith("deno install --global "));
  assert.ok(line, "the README has an install command");
  return line.split(" ").slice(1);
}

/**
 * Runs the README's install command from the checkout, with its `--root /usr/local` moved to
 * `prefix`; returns the path of the `vhostd` it installed.
 */
async function installVhostd(prefix: string): Promise<string> {
  const args = readmeInstallCommand();
  const at = args.indexOf("/usr/local");
  assert.equal(args[at - 1], "--root", "the README installs into /usr/local");
  args[at] = prefix;
  const out = await new Deno.Command(Deno.execPath(), { args, cwd: daemonFile("") }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return `${prefix}/bin/vhostd`;
}

Deno.test("the README's install command puts a working vhostd on PATH", async () => {
  const prefix = await Deno.makeTempDir({ prefix: "vhostd-install-" });
  try {
    const vhostd = await installVhostd(prefix);
    const elsewhere = await Deno.makeTempDir({ prefix: "vhostd-cwd-" });
    const run = async (...args: string[]) => {
      const out = await new Deno.Command(vhostd, {
        args,
        cwd: elsewhere, // not the checkout: the script must not depend on where it is run
        env: { PATH: `${prefix}/bin:${Deno.execPath().replace(/\/[^/]*$/, "")}:/usr/bin:/bin` },
      }).output();
      const dec = new TextDecoder();
      return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
    };
    const manifest = JSON.parse(Deno.readTextFileSync(daemonFile("deno.json")));
    const version = await run("--version");
    assert.equal(version.code, 0, version.stderr);
    assert.match(
      version.stdout,
      new RegExp(`^vhostd ${manifest.version.replaceAll(".", "\\.")}$`, "m"),
    );
    const help = await run("blk", "--help");
    assert.match(help.stdout, /^Usage: vhostd blk /m, "messages name the installed command");
    const bad = await run("blk", "--socket", `${elsewhere}/x.sock`, "--image", "missing.img");
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /^vhostd blk: image not found: missing\.img$/m);
    await Deno.remove(elsewhere, { recursive: true });
  } finally {
    await Deno.remove(prefix, { recursive: true });
  }
});

/**
 * `systemd-analyze verify --root`: the unit is checked exactly as shipped, in a scratch root that
 * has the host's system units and vhostd installed where the unit expects it, by the README's
 * install command. With `socket`, vhostd@.socket with the example VM's drop-in is checked instead.
 */
async function verifyInRoot(
  dropIn: boolean,
  socket = false,
): Promise<{ code: number; output: string }> {
  const root = await Deno.makeTempDir({ prefix: "vhostd-unit-" });
  try {
    Deno.mkdirSync(`${root}/etc/systemd/system`, { recursive: true });
    Deno.mkdirSync(`${root}/usr/lib/systemd`, { recursive: true });
    await installVhostd(`${root}/usr/local`);
    // ExecReload= runs /bin/kill, which verify checks is there.
    Deno.mkdirSync(`${root}/bin`);
    Deno.copyFileSync("/bin/kill", `${root}/bin/kill`);
    Deno.chmodSync(`${root}/bin/kill`, 0o755);
    const cp = await new Deno.Command("cp", {
      args: ["-a", "/usr/lib/systemd/system", `${root}/usr/lib/systemd/`],
    }).output();
    assert.equal(cp.code, 0, new TextDecoder().decode(cp.stderr));
    Deno.copyFileSync(`${UNIT_DIR}/vhostd@.service`, `${root}/etc/systemd/system/vhostd@.service`);
    if (dropIn) {
      Deno.mkdirSync(`${root}/etc/systemd/system/vhostd@vm1.service.d`);
      Deno.copyFileSync(
        `${UNIT_DIR}/vhostd@.service.d/tap.conf`,
        `${root}/etc/systemd/system/vhostd@vm1.service.d/tap.conf`,
      );
    }
    if (socket) {
      const units = `${root}/etc/systemd/system`;
      Deno.copyFileSync(`${UNIT_DIR}/vhostd@.socket`, `${units}/vhostd@.socket`);
      Deno.mkdirSync(`${units}/vhostd@vm1.socket.d`);
      Deno.copyFileSync(
        `${UNIT_DIR}/vhostd@vm1.socket.d/sockets.conf`,
        `${units}/vhostd@vm1.socket.d/sockets.conf`,
      );
    }
    const out = await new Deno.Command("systemd-analyze", {
      args: ["verify", `--root=${root}`, socket ? "vhostd@vm1.socket" : "vhostd@vm1.service"],
      env: { SYSTEMD_LOG_COLOR: "0" },
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, output: dec.decode(out.stdout) + dec.decode(out.stderr) };
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

Deno.test("systemd-analyze verify passes on vhostd@.service, with and without the TAP drop-in, and on vhostd@.socket", async () => {
  for (const [dropIn, socket] of [[false, false], [true, false], [false, true]]) {
    const r = await verifyInRoot(dropIn, socket);
    assert.equal(r.code, 0, r.output);
    // Warnings (unknown keys, bad values) do not change the exit code: there must be none.
    assert.equal(r.output.trim(), "", r.output);
  }
  const unit = Deno.readTextFileSync(`${UNIT_DIR}/vhostd@.service`);
  for (
    const line of [
      "Type=notify",
      "Restart=on-failure",
      // A config mistake (exit 2) must not restart in a loop; a missing config fails loudly;
      // "systemctl reload" re-reads the config.
      "RestartPreventExitStatus=2",
      "AssertPathExists=/etc/vhostd/%i.json",
      "ExecReload=/bin/kill -HUP $MAINPID",
      "RuntimeDirectoryPreserve=yes",
      "RuntimeDirectory=vhostd/%i",
      "NoNewPrivileges=yes",
      "ProtectSystem=strict",
      "PrivateTmp=yes",
      "CapabilityBoundingSet=",
      "ExecStart=/usr/local/bin/vhostd run --config /etc/vhostd/%i.json",
    ]
  ) assert.ok(unit.split("\n").includes(line), line);
  assert.ok(!/^ConditionPathExists=/m.test(unit), "a missing config must not be skipped silently");
});

async function withVm(fn: (dir: string, config: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-notify-" });
  try {
    sparseFile(`${dir}/a.img`, 8 * MiB);
    sparseFile(`${dir}/b.img`, 8 * MiB);
    const config = `${dir}/vm.json`;
    Deno.writeTextFileSync(
      config,
      JSON.stringify({
        name: "notifyvm",
        socketDir: dir,
        metrics: "127.0.0.1:0",
        devices: [
          { type: "blk", id: "a", image: `${dir}/a.img`, queues: 1 },
          { type: "blk", id: "b", image: `${dir}/b.img`, queues: 2 },
        ],
      }),
    );
    await fn(dir, config);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("sd_notify: READY=1 only once every socket serves; STATUS, WATCHDOG, STOPPING", () =>
  withVm(async (dir, config) => {
    const notify = new NotifySocket(`${dir}/notify.sock`);
    const d = DaemonProcess.spawn(["run", "--config", config], {
      NOTIFY_SOCKET: notify.address,
      WATCHDOG_USEC: "400000",
    });
    try {
      const ready = await notify.waitFor("READY=1", 30_000);
      // The first thing systemd hears is READY=1: nothing claimed readiness earlier.
      assert.equal(ready, 0, JSON.stringify(notify.messages));
      assert.match(
        notify.messages[0].text,
        /^STATUS=notifyvm: serving 2 device\(s\), 0 front-end/m,
      );
      // Right now, every device answers the vhost-user protocol (not just a listening socket:
      // its worker is in its loop), and the control socket answers status.
      for (const name of ["a", "b"]) {
        const fe = await FrontendConnection.connect(`${dir}/${name}.sock`);
        try {
          assert.ok(fe.getFeatures() & (1n << 32n), `${name}: VIRTIO_F_VERSION_1 offered`);
        } finally {
          fe.close();
        }
      }
      const status = await requestStatus(`${dir}/control.sock`);
      assert.deepEqual(status.devices.map((x) => x.name), ["a", "b"]);
      // Watchdog: pinged every half period (200 ms here).
      const firstPing = await notify.waitFor("WATCHDOG=1", 5_000);
      const t0 = notify.messages[firstPing].at;
      await new Promise((r) => setTimeout(r, 700));
      notify.drain();
      const pings = notify.messages.filter((m) => m.text === "WATCHDOG=1" && m.at > t0).length;
      assert.ok(pings >= 2, `pings after the first: ${pings}`);
      // A front-end coming and going shows in STATUS= (polled once a second).
      const fe = await FrontendConnection.connect(`${dir}/a.sock`);
      await notify.waitFor("STATUS=notifyvm: serving 2 device(s), 1 front-end(s) connected", 5_000);
      fe.close();
      assert.equal(await d.stop(), 0, d.stderr);
      notify.drain();
      assert.ok(notify.messages.some((m) => m.text.startsWith("STOPPING=1")), d.stderr);
    } finally {
      await d.stop();
      notify.close();
    }
  }));

Deno.test("sd_notify: an abstract NOTIFY_SOCKET (@name) works too", () =>
  withVm(async (_dir, config) => {
    const notify = new NotifySocket(`@vhostd-test-${Deno.pid}-${Date.now()}`);
    const d = DaemonProcess.spawn(["run", "--config", config], { NOTIFY_SOCKET: notify.address });
    try {
      await notify.waitFor("READY=1", 30_000);
      assert.match(notify.messages[0].text, new RegExp(`^MAINPID=${d.child.pid}$`, "m"));
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
      notify.close();
    }
  }));

/**
 * `systemd-socket-activate` binds the listed sockets, waits for the first connection, then
 * execs the daemon with them as fds 3, 4, ... (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), as
 * systemd does for a .socket unit.
 */
function spawnSocketActivated(
  listen: string[],
  extraArgs: string[],
  vhostdArgs: string[],
): DaemonProcess {
  const pass = ["NO_COLOR", "HOME", "PATH", "DENO_DIR"].filter((v) =>
    Deno.env.get(v) ?? v === "NO_COLOR"
  );
  return DaemonProcess.spawnUnder(
    [
      "systemd-socket-activate",
      ...listen.flatMap((l) => ["-l", l]),
      ...extraArgs,
      ...pass.flatMap((v) => ["-E", v]),
    ],
    ["run", "-A", daemonFile("daemon/main.ts"), ...vhostdArgs],
  );
}

Deno.test("socket activation: a front-end that connects before the daemon runs is served; passed sockets outlive the daemon", () =>
  withVm(async (dir, config) => {
    // a's socket is matched by its path; b's, bound elsewhere, by its FileDescriptorName (b's
    // id); the third matches no device (a warning, and it stays unused).
    const d = spawnSocketActivated(
      [`${dir}/a.sock`, `${dir}/elsewhere.sock`, `${dir}/spare.sock`],
      ["--fdname=vm-a:b:spare"],
      ["run", "--config", config],
    );
    try {
      await d.waitFor(() => d.stderr.includes("spare.sock as 5"), 30_000, "the listening sockets");
      // The daemon is not even started yet: systemd-socket-activate starts it on this connection,
      // which waits in the backlog meanwhile.
      assert.ok(!d.stderr.includes("Execing"), d.stderr);
      const fe = await FrontendConnection.connect(`${dir}/a.sock`, { timeoutMs: 60_000 });
      try {
        assert.ok(fe.getFeatures() & (1n << 32n), "VIRTIO_F_VERSION_1 offered");
      } finally {
        fe.close();
      }
      await d.waitFor(() => d.stdout.includes("vhostd: serving"), 30_000, "the banner");
      const b = await FrontendConnection.connect(`${dir}/elsewhere.sock`);
      assert.ok(b.getFeatures() & (1n << 32n));
      b.close();
      // b's socket was passed: the daemon bound none at b.sock.
      assert.throws(() => Deno.lstatSync(`${dir}/b.sock`), Deno.errors.NotFound);
      assert.match(
        d.stderr,
        /socket activation: fd 5 \(.*spare\.sock, FileDescriptorName=spare\) matches no device/,
      );
      const status = await requestStatus(`${dir}/control.sock`);
      assert.deepEqual(status.devices.map((x) => [x.name, x.connects]), [["a", 1], ["b", 1]]);

      // A reload that removes a leaves its passed socket in place: a front-end connecting now
      // waits in the backlog, and is served once a reload adds a back.
      const vm = JSON.parse(Deno.readTextFileSync(config));
      const all = vm.devices;
      Deno.writeTextFileSync(config, JSON.stringify({ ...vm, devices: all.slice(1) }));
      Deno.kill(d.child.pid, "SIGHUP");
      await d.waitFor(() => d.stderr.includes("reloaded:"), 30_000, "the reload removing a");
      assert.ok(Deno.lstatSync(`${dir}/a.sock`).isSocket);
      const waiting = await FrontendConnection.connect(`${dir}/a.sock`, { timeoutMs: 60_000 });
      try {
        Deno.writeTextFileSync(config, JSON.stringify({ ...vm, devices: all }));
        Deno.kill(d.child.pid, "SIGHUP");
        assert.ok(waiting.getFeatures() & (1n << 32n), "served after the second reload");
      } finally {
        waiting.close();
      }
      await d.waitFor(
        () => /reloaded: 1 device\(s\) kept, 1 started, 0 stopped/.test(d.stderr),
        30_000,
        "the reload adding a back",
      );
      assert.equal(await d.stop(), 0, d.stderr);
      // The passed sockets are systemd's: still there after the daemon's exit (the daemon's own
      // control socket is gone).
      for (const name of ["a.sock", "elsewhere.sock", "spare.sock"]) {
        assert.ok(Deno.lstatSync(`${dir}/${name}`).isSocket, name);
      }
      assert.throws(() => Deno.lstatSync(`${dir}/control.sock`), Deno.errors.NotFound);
    } finally {
      await d.stop();
    }
  }));

Deno.test("socket activation: a passed fd that is not a listening stream socket is refused with one clear error", () =>
  withVm(async (dir, config) => {
    const d = spawnSocketActivated([`${dir}/a.sock`], ["--datagram"], ["run", "--config", config]);
    try {
      await d.waitFor(() => d.stderr.includes("as 3"), 30_000, "the listening socket");
      sendDatagram(`${dir}/a.sock`, new TextEncoder().encode("wake up"));
      assert.equal(await d.exit(), 2, d.stderr);
      assert.match(
        d.stderr,
        /socket activation: passed fd 3 is not a listening Unix stream socket .*not SOCK_STREAM/,
      );
      assert.doesNotMatch(d.stderr, /\n\s+at /, "no stack trace");
    } finally {
      await d.stop();
    }
  }));

/**
 * Runs `vhostd ...args` with stderr as the stream JOURNAL_STREAM names, which is how systemd
 * starts a unit whose output goes to journald (StandardError=journal, the default).
 */
function spawnWithJournalStream(args: string[]): DaemonProcess {
  const setStream = 'export JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); exec "$@"';
  return DaemonProcess.spawnUnder(["sh", "-c", setStream, "sh"], ["run", "-A", MAIN, ...args]);
}

const MAIN = daemonFile("daemon/main.ts");

Deno.test("journald: each line carries its syslog priority and no second timestamp", async () => {
  // A usage error: priority 3 (err), so that `journalctl -p err` finds it.
  const bad = spawnWithJournalStream(["blk", "--socket", "/tmp/x.sock", "--image", "/nonexistent"]);
  assert.equal(await bad.exit(), 2);
  assert.match(bad.stderr, /^<3>vhostd blk: image not found: \/nonexistent$/m);
  // A running daemon: info at 6, warnings at 4; the journal stamps entries, so lines do not.
  const d = spawnWithJournalStream(["start", "--metrics", "0.0.0.0:0", "--metrics-any-address"]);
  try {
    await d.waitFor(() => d.stderr.includes("unauthenticated"), 30_000, "the metrics warning");
    assert.match(d.stderr, /^<6>\[INF\] vhostd\.daemon: metrics on http:/m);
    assert.match(d.stderr, /^<4>\[WRN\] vhostd\.daemon: metrics on 0\.0\.0\.0 are served/m);
    for (const line of d.stderr.trim().split("\n")) {
      assert.match(line, /^<[0-7]>\[[A-Z]{3}\] vhostd\./, "every line has a priority");
    }
  } finally {
    assert.equal(await d.stop(), 0, d.stderr);
  }
});

Deno.test("journald: an inherited JOURNAL_STREAM that is not stderr changes nothing", async () => {
  // A shell pipe inside a unit redirects stderr but keeps the variable: no `<N>` then.
  const r = DaemonProcess.spawn(["blk", "--socket", "/tmp/x.sock", "--image", "/nonexistent"], {
    JOURNAL_STREAM: "1:1",
  });
  assert.equal(await r.exit(), 2);
  assert.match(r.stderr, /^vhostd blk: image not found: \/nonexistent$/m);
});
