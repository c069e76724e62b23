/**
 * The `console` device of config files: served by `vhostd run` next to a blk device, with its
 * attach sockets and logs, a front-end doing the port handshake, and guest output reaching an
 * attached client; bad console fields are one line naming the field, exit 2, nothing left behind.
 * Also `vhostd console` with the shared serving options (--control, --metrics).
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile } from "./helpers/daemon.ts";
import { AttachClient } from "./helpers/attach.ts";
import { ConsoleDriver } from "../vhost-user/frontend/console_driver.ts";
import { ControlEvent } from "../devices/console/mod.ts";

const enc = new TextEncoder();
const MiB = 1 << 20;

function isSocket(path: string): boolean {
  try {
    return Deno.statSync(path).isSocket === true;
  } catch {
    return false;
  }
}

Deno.test("run --config: a blk and a console device; the console serves a front-end and clients", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-runcon-" });
  const config = `${dir}/vm.json`;
  sparseFile(`${dir}/disk.img`, 8 * MiB);
  Deno.writeTextFileSync(
    config,
    JSON.stringify({
      name: "vmc",
      socketDir: dir,
      devices: [
        { type: "blk", id: "disk", image: `${dir}/disk.img` },
        {
          type: "console",
          id: "con",
          names: ["agent"],
          log: `${dir}/con.log`,
          size: "100x30",
          scrollback: 4096,
        },
      ],
    }),
  );
  const d = await DaemonProcess.start(["run", "--config", config]);
  let driver: ConsoleDriver | null = null;
  const sock = `${dir}/con.sock`;
  try {
    assert.match(d.stdout, /con: console \(2 port\(s\): console, agent/);
    assert.match(d.stdout, /vhost-user-test-device-pci,chardev=con,virtio-id=3,num_vqs=6/);
    for (const p of [sock, `${sock}.console`, `${sock}.agent`, `${dir}/disk.sock`]) {
      assert.ok(isSocket(p), `${p} is a listening socket`);
    }

    driver = await ConsoleDriver.connect(sock, { ports: 2 });
    assert.deepEqual(driver.config(), { cols: 100, rows: 30, maxNrPorts: 2 });
    const answers = driver.handshake(2);
    assert.deepEqual(answers.get(0)!.map((m) => m.event), [
      ControlEvent.CONSOLE_PORT,
      ControlEvent.RESIZE,
      ControlEvent.PORT_OPEN,
    ]);
    const agent = answers.get(1)!;
    assert.deepEqual(agent.map((m) => m.event), [ControlEvent.PORT_NAME, ControlEvent.PORT_OPEN]);
    assert.equal(new TextDecoder().decode(agent[0].extra), "agent");
    driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
    driver.sendControl(1, ControlEvent.PORT_OPEN, 1);

    const consoleClient = await AttachClient.connect(`${sock}.console`);
    const agentClient = await AttachClient.connect(`${sock}.agent`);
    try {
      driver.write(0, enc.encode("login: "));
      await consoleClient.waitFor("login: ", 5000);
      driver.write(1, enc.encode("agent ready\n"));
      await agentClient.waitFor("agent ready\n", 5000);
      await consoleClient.send("root\n");
      assert.equal(driver.readUntil(0, "root\n"), "root\n");
    } finally {
      await consoleClient.close();
      await agentClient.close();
    }
    assert.equal(await Deno.readTextFile(`${dir}/con.log`), "login: ");
    assert.equal(await Deno.readTextFile(`${dir}/con.log.agent`), "agent ready\n");

    const status = await runVhostd(["status", "--control", `${dir}/control.sock`]);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /con\b.*console/);
  } finally {
    driver?.close();
    try {
      assert.equal(await d.stop(), 0, d.stderr);
      // The attach sockets go with the daemon; the logs stay.
      for (const p of [sock, `${sock}.console`, `${sock}.agent`]) assert.ok(!isSocket(p), p);
      assert.ok(Deno.statSync(`${dir}/con.log`).isFile);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("run --config: a bad console field is one line naming it, exit 2, nothing left behind", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-runcon-" });
  try {
    sparseFile(`${dir}/a.img`, 8 * MiB);
    const con = { type: "console", id: "con", names: ["agent"] };
    const cases: [string, unknown[], RegExp][] = [
      [
        "bad port name",
        [{ ...con, names: ["agent", "a b"] }],
        /^devices\[0\]\.names\[1\]: must be letters, digits, .* not "a b"$/,
      ],
      [
        "port named console",
        [{ ...con, names: ["console"] }],
        /^devices\[0\]\.names: must be unique \(and "console" is port 0\): console, console$/,
      ],
      ["bad size", [{ ...con, size: "80" }], /^devices\[0\]\.size: must be COLSxROWS like 120x40/],
      [
        "scrollback too small",
        [{ ...con, scrollback: 10 }],
        /^devices\[0\]\.scrollback: must be a whole number from 1024 to \d+, not 10$/,
      ],
      [
        "chardev mode",
        [{ ...con, chardev: true }],
        /^devices\[0\]\.chardev: character-device mode is only served by `vhostd console --chardev`/,
      ],
      [
        "log folder missing",
        [{ ...con, log: `${dir}/missing/con.log` }],
        /^devices\[0\]\.log: cannot open log .*missing\/con\.log: /,
      ],
      [
        "misspelt field",
        [{ ...con, scrolback: 4096 }],
        /^devices\[0\]\.scrolback: unknown field \(did you mean "scrollback"\?\)$/,
      ],
      [
        // The console plans (binds its attach sockets, creates its logs) before the blk fails:
        // all of it is undone.
        "a later device fails",
        [con, { type: "blk", id: "disk", image: `${dir}/nope.img` }],
        /^devices\[1\]\.image: file not found: /,
      ],
    ];
    for (const [i, [name, devices, re]] of cases.entries()) {
      const file = `${dir}/case${i}.json`;
      Deno.writeTextFileSync(file, JSON.stringify({ socketDir: dir, devices }));
      const r = await runVhostd(["run", "--config", file]);
      const lines = r.stderr.trimEnd().split("\n");
      assert.equal(r.code, 2, `${name}: exit code\n${r.stderr}`);
      assert.equal(lines.length, 1, `${name}: one line\n${r.stderr}`);
      assert.match(lines[0].replace(/^vhostd run: /, ""), re, name);
      assert.equal(r.stdout, "", name);
    }
    const left = [...Deno.readDirSync(dir)].map((e) => e.name)
      .filter((n) => !/^(a\.img|case\d+\.json)$/.test(n));
    assert.deepEqual(left, [], "no socket or log left behind");

    // --check plans the console too, and leaves nothing behind either.
    Deno.writeTextFileSync(`${dir}/ok.json`, JSON.stringify({ socketDir: dir, devices: [con] }));
    const r = await runVhostd(["run", "--config", `${dir}/ok.json`, "--check"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /-device vhost-user-test-device-pci,chardev=con,virtio-id=3,num_vqs=6/);
    assert.deepEqual(
      [...Deno.readDirSync(dir)].map((e) => e.name).filter((n) => n.startsWith("con")),
      [],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("console: --control and --metrics serve status and metrics; --chardev refuses them", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-runcon-" });
  const sock = `${dir}/con.sock`;
  const d = await DaemonProcess.start([
    "console",
    "--socket",
    sock,
    "--control",
    `${dir}/ctl.sock`,
    "--metrics",
    "127.0.0.1:0",
  ]);
  try {
    const status = await runVhostd(["status", "--control", `${dir}/ctl.sock`]);
    assert.equal(status.code, 0, status.stderr);
    assert.match(status.stdout, /console/);
    await d.waitFor(
      () => /metrics on http:\/\/127\.0\.0\.1:\d+/.test(d.stderr + d.stdout),
      5000,
      "metrics",
    );
    const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(d.stderr + d.stdout)![1];
    const res = await fetch(`http://127.0.0.1:${port}/metrics`);
    const body = await res.text();
    assert.equal(res.status, 200);
    assert.match(body, /type="console"/);
  } finally {
    try {
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
  for (const flag of [["--metrics", "127.0.0.1:0"], ["--control", "/tmp/x.sock"]]) {
    const r = await runVhostd(["console", "--chardev", "--socket", "/tmp/x", ...flag]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr.trim(), /^vhostd console: --\w+ needs vhost-user mode \(no --chardev\)$/);
  }
});
