/**
 * `vhostd run` reloading its config on SIGHUP, with real front-end connections: a device kept
 * as it was keeps its connection, an added one serves, a removed one's socket is gone, a changed
 * one restarts; a broken config changes nothing; reloads and a stop coming together end cleanly.
 */

import assert from "node:assert/strict";
import { DaemonProcess, exists, sparseFile, withDir } from "./helpers/daemon.ts";
import { NotifySocket } from "./helpers/notify_socket.ts";
import { FrontendConnection } from "../vhost-user/frontend/connection.ts";
import { requestStatus } from "../daemon/control.ts";

const MiB = 1 << 20;

interface Device {
  type: string;
  id: string;
  image?: string;
  queues?: number;
  _comment?: string;
}

function writeConfig(dir: string, devices: Device[], extra: Record<string, unknown> = {}): string {
  const config = `${dir}/vm.json`;
  Deno.writeTextFileSync(
    config,
    JSON.stringify({ name: "reloadvm", socketDir: dir, metrics: "127.0.0.1:0", ...extra, devices }),
  );
  return config;
}

const blk = (dir: string, id: string, queues = 1): Device => ({
  type: "blk",
  id,
  image: `${dir}/${id}.img`,
  queues,
});

/** Negotiates protocol features (MQ among them) and asks GET_QUEUE_NUM. */
function queueNum(fe: FrontendConnection): number {
  if (fe.protocolFeatures === 0n) fe.setProtocolFeatures(fe.getProtocolFeatures());
  return fe.getQueueNum();
}

/**
 * Sends SIGHUP and waits for the reload's RELOADING=1 and then READY=1; returns the
 * notifications from RELOADING=1 on.
 */
async function reload(d: DaemonProcess, notify: NotifySocket): Promise<string[]> {
  notify.drain();
  const from = notify.messages.length;
  Deno.kill(d.child.pid, "SIGHUP");
  const end = Date.now() + 30_000;
  for (;;) {
    notify.drain();
    const said = notify.messages.slice(from).map((m) => m.text);
    const reloading = said.findIndex((t) => t.split("\n").includes("RELOADING=1"));
    if (reloading >= 0 && said.slice(reloading).some((t) => t.split("\n").includes("READY=1"))) {
      // systemd 253+ (Type=notify-reload) wants CLOCK_MONOTONIC with it.
      assert.match(said[reloading], /^MONOTONIC_USEC=\d+$/m, said[reloading]);
      return said.slice(reloading);
    }
    if (Date.now() > end) throw new Error(`no RELOADING=1 then READY=1: ${JSON.stringify(said)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

Deno.test("reload: SIGHUP keeps unchanged devices connected, starts added ones, stops removed ones, restarts changed ones", () =>
  withDir("vhostd-reload-", async (dir) => {
    for (const id of ["a", "b", "c", "d"]) sparseFile(`${dir}/${id}.img`, 8 * MiB);
    const config = writeConfig(dir, [blk(dir, "a"), blk(dir, "b"), blk(dir, "d")]);
    const notify = new NotifySocket(`${dir}/notify.sock`);
    const d = DaemonProcess.spawn(["run", "--config", config], { NOTIFY_SOCKET: notify.address });
    const open: FrontendConnection[] = [];
    try {
      await notify.waitFor("READY=1", 30_000);
      await d.waitFor(() => /metrics on http:\/\/[^:]+:\d+/.test(d.stderr), 10_000, "metrics");
      const port = Number(/metrics on http:\/\/[^:]+:(\d+)/.exec(d.stderr)![1]);
      const a = await FrontendConnection.connect(`${dir}/a.sock`);
      const dOld = await FrontendConnection.connect(`${dir}/d.sock`);
      open.push(a, dOld);
      assert.equal(queueNum(a), 1);
      assert.equal(queueNum(dOld), 1);

      // a: the same entry (a comment added does not count); b: removed; c: added; d: 2 queues.
      writeConfig(dir, [
        { ...blk(dir, "a"), _comment: "unchanged" },
        blk(dir, "c"),
        blk(dir, "d", 2),
      ]);
      const said = await reload(d, notify);
      assert.match(said.at(-1)!, /^STATUS=reloadvm: serving 3 device\(s\)/m, said.join("|"));

      // a's connection was never interrupted: the same connection goes on answering.
      assert.equal(queueNum(a), 1);
      assert.equal(a.waitClosed(200), false);
      // b's socket is gone; c's serves; d restarted with its new settings (its old connection
      // was closed, and QEMU would reconnect).
      assert.equal(exists(`${dir}/b.sock`), false);
      const c = await FrontendConnection.connect(`${dir}/c.sock`);
      open.push(c);
      assert.ok(c.getFeatures() & (1n << 32n));
      assert.equal(dOld.waitClosed(5000), true);
      const dNew = await FrontendConnection.connect(`${dir}/d.sock`);
      open.push(dNew);
      assert.equal(queueNum(dNew), 2);

      // status and metrics see the new set; a's one connection is still the first.
      const status = await requestStatus(`${dir}/control.sock`);
      assert.deepEqual(status.devices.map((x) => x.name), ["a", "c", "d"]);
      const aStatus = status.devices.find((x) => x.name === "a")!;
      assert.equal(aStatus.connects, 1);
      assert.notEqual(aStatus.frontEnd, null);
      const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      assert.match(metrics, /vhostd_device_up\{vm="reloadvm",device="c",type="blk"\} 1/);
      assert.doesNotMatch(metrics, /device="b"/);
      await d.waitFor(() => d.stderr.includes("reloaded:"), 10_000, "the reload's log");
      assert.match(d.stderr, /b: stopped \(removed\)/);
      assert.match(d.stderr, /d: stopped \(changed; restarting it\)/);
      assert.match(d.stderr, /reloaded: 1 device\(s\) kept, 2 started, 2 stopped/);

      for (const fe of open) fe.close();
      open.length = 0;
      assert.equal(await d.stop(), 0, d.stderr);
      for (const id of ["a", "c", "d"]) assert.equal(exists(`${dir}/${id}.sock`), false, id);
    } finally {
      for (const fe of open) fe.close();
      await d.stop();
      notify.close();
    }
  }));

Deno.test("reload: a broken config (or a setting that cannot change) keeps every device as it was, with one error", () =>
  withDir("vhostd-reload-", async (dir) => {
    for (const id of ["a", "b"]) sparseFile(`${dir}/${id}.img`, 8 * MiB);
    const config = writeConfig(dir, [blk(dir, "a"), blk(dir, "b")]);
    const notify = new NotifySocket(`${dir}/notify.sock`);
    const d = DaemonProcess.spawn(["run", "--config", config], { NOTIFY_SOCKET: notify.address });
    let a: FrontendConnection | null = null;
    try {
      await notify.waitFor("READY=1", 30_000);
      a = await FrontendConnection.connect(`${dir}/a.sock`);
      assert.equal(queueNum(a), 1);
      const broken: [string, () => void, RegExp][] = [
        [
          "a missing image",
          () => writeConfig(dir, [blk(dir, "a"), blk(dir, "b"), blk(dir, "nothere")]),
          /devices\[2\]\.image: file not found: .*nothere\.img/,
        ],
        ["not JSON", () => Deno.writeTextFileSync(config, "{ devices: ["), /not valid JSON/],
        [
          "a typo in a kept device",
          () => writeConfig(dir, [{ ...blk(dir, "a"), queus: 2 } as Device, blk(dir, "b")]),
          /devices\[0\]\.queus: unknown field/,
        ],
        [
          "a new VM name",
          () => writeConfig(dir, [blk(dir, "a")], { name: "other" }),
          /name: cannot change while vhostd runs \("reloadvm" before, "other" now\)/,
        ],
        [
          "another metrics address",
          () => writeConfig(dir, [blk(dir, "a")], { metrics: "127.0.0.1:9" }),
          /metrics: cannot change while vhostd runs/,
        ],
      ];
      for (const [what, write, expected] of broken) {
        const errorsBefore = d.stderr.split("\n").filter((l) => l.includes("[ERR]")).length;
        write();
        await reload(d, notify);
        // The error is logged before READY=1 is sent, but stderr may arrive after it.
        const errorLines = () => d.stderr.split("\n").filter((l) => l.includes("[ERR]"));
        await d.waitFor(() => errorLines().length > errorsBefore, 10_000, `${what}: the error`);
        const errors = errorLines();
        assert.equal(errors.length, errorsBefore + 1, `${what}: ${d.stderr}`);
        assert.match(errors.at(-1)!, /reload failed, still serving the previous configuration/);
        assert.match(errors.at(-1)!, expected, what);
        // Nothing changed: a's connection answers, b still serves, status lists both.
        assert.equal(queueNum(a), 1, what);
        const b = await FrontendConnection.connect(`${dir}/b.sock`);
        assert.ok(b.getFeatures() & (1n << 32n), what);
        b.close();
        const status = await requestStatus(`${dir}/control.sock`);
        assert.deepEqual(status.devices.map((x) => x.name), ["a", "b"], what);
        assert.equal(status.devices[0].connects, 1, what);
      }
      assert.equal(d.alive, true);
      a.close();
      a = null;
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      a?.close();
      await d.stop();
      notify.close();
    }
  }));

Deno.test("reload: SIGHUPs in a row are applied one at a time, and a stop right after them ends cleanly", () =>
  withDir("vhostd-reload-", async (dir) => {
    for (const id of ["a", "b", "c", "e"]) sparseFile(`${dir}/${id}.img`, 8 * MiB);
    const config = writeConfig(dir, [blk(dir, "a"), blk(dir, "b")]);
    // Workers take 1.5 s to stop, as with a slow final flush: a reload stopping devices is then
    // still under way when the next signal comes.
    const d = await DaemonProcess.start(["run", "--config", config], {
      VHOSTD_FAULT_SLOW_SHUTDOWN_MS: "1500",
    });
    try {
      writeConfig(dir, [blk(dir, "a"), blk(dir, "c"), blk(dir, "e")]);
      for (let i = 0; i < 3; i++) Deno.kill(d.child.pid, "SIGHUP");
      await d.waitFor(() => d.stderr.includes("reloaded:"), 30_000, "a reload");
      // The set is what the file says, once, however many SIGHUPs came.
      const status = await requestStatus(`${dir}/control.sock`);
      assert.deepEqual(status.devices.map((x) => x.name), ["a", "c", "e"]);
      // A stop while a reload is under way (stopping c and e) waits for it; the reload starts
      // nothing more, and every device stops.
      writeConfig(dir, [blk(dir, "a"), blk(dir, "b")]);
      const reloads = () => d.stderr.split("SIGHUP: reloading").length - 1;
      const before = reloads();
      Deno.kill(d.child.pid, "SIGHUP");
      await d.waitFor(() => reloads() > before, 10_000, "the last reload");
      assert.equal(await d.stop(), 0, d.stderr);
      assert.match(
        d.stderr.split("\n").filter((l) => l.includes("reloaded:")).at(-1)!,
        /0 started/,
      );
      const left = [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.endsWith(".sock"));
      assert.deepEqual(left, [], d.stderr);
      assert.doesNotMatch(d.stderr, /\[(ERR|FTL)\]/);
    } finally {
      await d.stop();
    }
  }));
