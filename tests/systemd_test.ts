/**
 * Running under systemd, as far as this machine allows without systemd as PID 1: the template
 * unit passes `systemd-analyze verify`, and the daemon speaks sd_notify the way `Type=notify`
 * and `WatchdogSec=` expect: READY=1 only once every socket serves, STATUS= lines, WATCHDOG=1
 * pings, STOPPING=1 on SIGTERM.
 */

import assert from "node:assert/strict";
import { daemonFile, DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { NotifySocket } from "./helpers/notify_socket.ts";
import { FrontendConnection } from "../vhost-user/frontend/connection.ts";
import { requestStatus } from "../daemon/control.ts";

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
 * install command.
 */
async function verifyInRoot(dropIn: boolean): Promise<{ code: number; output: string }> {
  const root = await Deno.makeTempDir({ prefix: "vhostd-unit-" });
  try {
    Deno.mkdirSync(`${root}/etc/systemd/system`, { recursive: true });
    Deno.mkdirSync(`${root}/usr/lib/systemd`, { recursive: true });
    await installVhostd(`${root}/usr/local`);
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
    const out = await new Deno.Command("systemd-analyze", {
      args: ["verify", `--root=${root}`, "vhostd@vm1.service"],
      env: { SYSTEMD_LOG_COLOR: "0" },
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, output: dec.decode(out.stdout) + dec.decode(out.stderr) };
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

Deno.test("systemd-analyze verify passes on vhostd@.service, with and without the TAP drop-in", async () => {
  for (const dropIn of [false, true]) {
    const r = await verifyInRoot(dropIn);
    assert.equal(r.code, 0, r.output);
    // Warnings (unknown keys, bad values) do not change the exit code: there must be none.
    assert.equal(r.output.trim(), "", r.output);
  }
  const unit = Deno.readTextFileSync(`${UNIT_DIR}/vhostd@.service`);
  for (
    const line of [
      "Type=notify",
      "Restart=on-failure",
      "RuntimeDirectory=vhostd/%i",
      "NoNewPrivileges=yes",
      "ProtectSystem=strict",
      "PrivateTmp=yes",
      "CapabilityBoundingSet=",
      "ExecStart=/usr/local/bin/vhostd run --config /etc/vhostd/%i.json",
    ]
  ) assert.ok(unit.split("\n").includes(line), line);
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
