/**
 * The console server in vhost-user mode with the project's TypeScript front-end playing the
 * guest's virtio_console driver: port handshake, multiport add/open/close, data both ways,
 * resize, emergency write, scrollback for a late client, input held while the guest has no
 * buffers, and the resize sequence.
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";
import { AttachClient } from "./helpers/attach.ts";
import { ConsoleDriver } from "../vhost-user/frontend/console_driver.ts";
import { CONFIG_EMERG_WR, ControlEvent, findResize } from "../devices/console/mod.ts";
import { ByteRing } from "../devices/console/byte_ring.ts";

const enc = new TextEncoder();

/** A daemon with a console and an "agent" port, and a driver connected to it. */
async function withConsole(
  fn: (
    ctx: { sock: string; dir: string; driver: ConsoleDriver; d: DaemonProcess },
  ) => Promise<void>,
  postRx = true,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-confe-" });
  const sock = `${dir}/con.sock`;
  const d = await DaemonProcess.start([
    "console",
    "--socket",
    sock,
    "--name",
    "agent",
    "--size",
    "100x30",
  ]);
  let driver: ConsoleDriver | null = null;
  try {
    driver = await ConsoleDriver.connect(sock, { ports: 2, postRx });
    await fn({ sock, dir, driver, d });
  } finally {
    driver?.close();
    try {
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
}

Deno.test("console: handshake adds both ports, marks the console, names the agent, opens them", async () => {
  await withConsole(({ driver }) => {
    assert.ok(driver.multiport, "MULTIPORT negotiated");
    assert.deepEqual(driver.config(), { cols: 100, rows: 30, maxNrPorts: 2 });
    const answers = driver.handshake(2);
    const events0 = answers.get(0)!.map((m) => m.event);
    assert.deepEqual(events0, [
      ControlEvent.CONSOLE_PORT,
      ControlEvent.RESIZE,
      ControlEvent.PORT_OPEN,
    ]);
    const resize = answers.get(0)![1].extra;
    const dv = new DataView(resize.buffer, resize.byteOffset);
    assert.deepEqual([dv.getUint16(0, true), dv.getUint16(2, true)], [30, 100], "rows, cols");
    const agent = answers.get(1)!;
    assert.deepEqual(agent.map((m) => m.event), [ControlEvent.PORT_NAME, ControlEvent.PORT_OPEN]);
    assert.equal(new TextDecoder().decode(agent[0].extra), "agent");
    assert.equal(agent[1].value, 1, "host side open");
    return Promise.resolve();
  });
});

Deno.test("console: output reaches clients, log and scrollback; input reaches the guest once it opens the port", async () => {
  await withConsole(async ({ sock, driver }) => {
    driver.handshake(2);
    driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
    const early = await AttachClient.connect(`${sock}.console`);
    const agentClient = await AttachClient.connect(`${sock}.agent`);
    try {
      driver.write(0, enc.encode("boot message\n"));
      await early.waitFor("boot message\n", 5000);
      // A client attaching later gets the scrollback first.
      const late = await AttachClient.connect(`${sock}.console`);
      try {
        await late.waitFor("boot message\n", 5000);
        driver.write(0, enc.encode("live line\n"));
        await late.waitFor("boot message\nlive line\n", 5000);
        await early.waitFor("boot message\nlive line\n", 5000);
      } finally {
        await late.close();
      }
      // The early client leaves; output written meanwhile is not lost.
      await early.close();
      driver.write(0, enc.encode("nobody watching\n"));
      const again = await AttachClient.connect(`${sock}.console`);
      await again.waitFor("nobody watching\n", 5000);
      await again.close();
      assert.equal(
        await Deno.readTextFile(`${sock}.console.log`),
        "boot message\nlive line\nnobody watching\n",
      );

      // Client to guest on the console port.
      await agentClient.send("held until opened\n");
      assert.equal(driver.rxPending(1, 300), false, "the agent port is not open yet");
      driver.sendControl(1, ControlEvent.PORT_OPEN, 1);
      assert.match(driver.readUntil(1, "held until opened\n"), /^held until opened\n$/);
      // Guest to client on the named port.
      driver.write(1, enc.encode("agent says hi\n"));
      await agentClient.waitFor("agent says hi\n");
      // Closing the port holds input again.
      driver.sendControl(1, ControlEvent.PORT_OPEN, 0);
      driver.conn.sync();
      await agentClient.send("after close\n");
      assert.equal(driver.rxPending(1, 300), false, "input waits while the port is closed");
      driver.sendControl(1, ControlEvent.PORT_OPEN, 1);
      assert.equal(driver.readUntil(1, "after close\n"), "after close\n");
    } finally {
      await agentClient.close();
    }
  });
});

Deno.test("console: input waits for receive buffers instead of being dropped", async () => {
  await withConsole(async ({ sock, driver }) => {
    driver.handshake(2);
    driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
    const c = await AttachClient.connect(`${sock}.console`);
    try {
      await c.send("typed before buffers\n");
      assert.equal(driver.rxPending(0, 300), false, "no buffers posted yet");
      driver.postRx(0, 2);
      assert.equal(driver.readUntil(0, "typed before buffers\n"), "typed before buffers\n");
    } finally {
      await c.close();
    }
  }, false);
});

Deno.test("console: resize from a client reaches the driver; emergency write lands in port 0's output", async () => {
  await withConsole(async ({ sock, driver }) => {
    driver.handshake(2);
    driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
    const c = await AttachClient.connect(`${sock}.console`);
    try {
      await c.send("ab\x1b[8;40;132tcd");
      const m = driver.waitControl((m) => m.event === ControlEvent.RESIZE);
      const dv = new DataView(m.extra.buffer, m.extra.byteOffset);
      assert.deepEqual([m.id, dv.getUint16(0, true), dv.getUint16(2, true)], [0, 40, 132]);
      assert.deepEqual(driver.config().cols, 132);
      assert.deepEqual(driver.config().rows, 40);
      // The sequence itself is not passed to the guest.
      assert.equal(driver.readUntil(0, "abcd"), "abcd");

      for (const ch of "SOS") driver.conn.setConfig(CONFIG_EMERG_WR, enc.encode(ch + "\0\0\0"));
      await c.waitFor("SOS");
      assert.match(await Deno.readTextFile(`${sock}.console.log`), /SOS$/);
    } finally {
      await c.close();
    }
  });
});

Deno.test("console: without MULTIPORT port 0 works alone on queues 0 and 1", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-confe-" });
  const sock = `${dir}/con.sock`;
  const d = await DaemonProcess.start(["console", "--socket", sock]);
  let driver: ConsoleDriver | null = null;
  const c = await AttachClient.connect(`${sock}.console`).catch(() => null);
  try {
    assert.ok(c);
    driver = await ConsoleDriver.connect(sock, { ports: 1, multiport: false });
    assert.equal(driver.multiport, false);
    driver.write(0, enc.encode("single port\n"));
    await c.waitFor("single port\n");
    await c.send("reply\n");
    assert.equal(driver.readUntil(0, "reply\n"), "reply\n");
  } finally {
    await c?.close();
    driver?.close();
    try {
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("console: the scrollback ring keeps the newest bytes; findResize parses xterm's sequence", () => {
  const r = new ByteRing(8);
  r.append(enc.encode("12345"));
  r.append(enc.encode("6789a"));
  assert.equal(new TextDecoder().decode(r.toBytes()), "3456789a");
  r.append(enc.encode("0123456789"));
  assert.equal(new TextDecoder().decode(r.toBytes()), "23456789");
  const q = new ByteRing(4);
  assert.equal(q.write(enc.encode("abcdef")), 4, "bounded: only what fits");
  q.consume(3);
  assert.equal(q.write(enc.encode("xyz")), 3);
  assert.equal(new TextDecoder().decode(q.toBytes()), "dxyz");
  assert.deepEqual(findResize(enc.encode("x\x1b[8;24;80ty")), {
    index: 1,
    length: 10,
    cols: 80,
    rows: 24,
  });
  assert.equal(findResize(enc.encode("\x1b[8;24t")), null);
  assert.equal(findResize(enc.encode("\x1b[A")), null);
});

Deno.test("console: bad command lines are usage errors (exit 2, one line)", async () => {
  for (
    const args of [
      ["console"],
      ["console", "--socket", "/tmp/x", "--ports", "0"],
      ["console", "--socket", "/tmp/x", "--name", "a b"],
      ["console", "--socket", "/tmp/x", "--ports", "1", "--name", "agent"],
      ["console", "--socket", "/tmp/x", "--attach", "serial"],
      ["console", "--socket", "/tmp/x", "--size", "80"],
    ]
  ) {
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("../daemon/main.ts", import.meta.url).pathname, ...args],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 2, `${args.join(" ")}: ${err}`);
    assert.equal(err.trim().split("\n").length, 1, err);
    assert.match(err, /^vhostd console: /);
  }
});
