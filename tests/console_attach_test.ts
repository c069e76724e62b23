/**
 * The console server's attach modes besides Unix sockets: `tcp:` on loopback, `pty` and `stdio`,
 * each with a guest in vhost-user mode (the project's ConsoleDriver) and in character-device mode
 * (the test plays QEMU's chardev on port 0's socket); the refusal of a non-loopback TCP address;
 * and a config file's `attach` list.
 */

import assert from "node:assert/strict";
import { DaemonProcess, exists, runVhostd, sparseFile } from "./helpers/daemon.ts";
import {
  AttachClient,
  PtyClient,
  waitForFile,
  withConsole,
  writeTokenFile,
} from "./helpers/attach.ts";
import { ConsoleDriver } from "../vhost-user/frontend/console_driver.ts";
import { ControlEvent } from "../devices/console/mod.ts";
import { parseAttach } from "../daemon/console_plan.ts";
import { setWindowSize } from "../sys/pty.ts";

const enc = new TextEncoder();
const MAIN = new URL("../daemon/main.ts", import.meta.url).pathname;

/** Port 0 seen from the guest's side, whichever mode carries it. */
interface Guest {
  /** Writes console output (the guest prints). */
  write(text: string): Promise<void>;
  /** Waits until the guest has received `text` as input. */
  readUntil(text: string): Promise<void>;
  /** The driver (vhost-user mode only). */
  driver: ConsoleDriver | null;
  /** Disconnects. */
  close(): Promise<void>;
}

/** The guest of the console on `sock`: a ConsoleDriver, or a fake QEMU on the chardev socket. */
async function connectGuest(sock: string, chardev: boolean, ports: number): Promise<Guest> {
  if (chardev) {
    const qemu = await AttachClient.connect(sock);
    return {
      driver: null,
      write: (text) => qemu.send(text),
      readUntil: async (text) => void await qemu.waitFor(text, 10_000),
      close: () => qemu.close(),
    };
  }
  const driver = await ConsoleDriver.connect(sock, { ports });
  driver.handshake(ports);
  driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
  return {
    driver,
    write: (text) => Promise.resolve(driver.write(0, enc.encode(text))),
    readUntil: (text) => Promise.resolve(void driver.readUntil(0, text, 10_000)),
    close: () => Promise.resolve(driver.close()),
  };
}

for (const chardev of [false, true]) {
  const mode = chardev ? "chardev mode" : "vhost-user mode";
  const modeArgs = chardev ? ["--chardev"] : [];

  Deno.test(`console attach tcp (${mode}): loopback with an ephemeral port, the token, scrollback, input to the guest`, async () => {
    let token = "";
    await withConsole(
      (sock) => {
        token = writeTokenFile(`${sock}.token`);
        return [
          ...modeArgs,
          ...["--name", "agent", "--attach", "tcp:127.0.0.1:0", "--attach", "tcp:0"],
          ...["--attach-token-file", `${sock}.token`],
        ];
      },
      async ({ sock, d }) => {
        const m = /port 0 console:(?: chardev \S+,)? attach tcp 127\.0\.0\.1:(\d+),/.exec(d.stdout);
        assert.ok(m, d.stdout);
        const port = Number(m[1]);
        assert.ok(port > 0);
        // tcp:PORT binds loopback too; TCP replaces the Unix attach socket.
        assert.match(d.stdout, /port 1 agent:(?: chardev \S+,)? attach tcp 127\.0\.0\.1:\d+,/);
        assert.equal(exists(`${sock}.console`), false);

        const guest = await connectGuest(sock, chardev, 2);
        let client: AttachClient | null = null;
        try {
          await guest.write("boot over tcp\r\n");
          await waitForFile(`${sock}.console.log`, "boot over tcp\r\n");
          client = await AttachClient.connectTcp(port, token);
          await client.waitFor("boot over tcp\r\n", 10_000); // the scrollback
          await client.send("typed over tcp\n");
          await guest.readUntil("typed over tcp\n");
          await guest.write("live line\r\n");
          await client.waitFor("boot over tcp\r\nlive line\r\n", 10_000);
        } finally {
          await client?.close();
          await guest.close();
        }
      },
    );
  });

  Deno.test(`console attach pty (${mode}): output to the pty, input from it, the link`, async () => {
    await withConsole(() => [...modeArgs, "--attach", "pty"], async ({ sock, d }) => {
      const m =
        /port 0 console:(?: chardev \S+,)? attach (\S+), pty (\/dev\/pts\/\d+) \(linked as (\S+)\),/
          .exec(
            d.stdout,
          );
      assert.ok(m, d.stdout);
      assert.equal(m[1], `${sock}.console`, "the Unix attach socket stays");
      assert.equal(m[3], `${sock}.console.pty`);
      assert.equal(Deno.readLinkSync(`${sock}.console.pty`), m[2]);

      const guest = await connectGuest(sock, chardev, 1);
      const pty = new PtyClient(`${sock}.console.pty`);
      let unix: AttachClient | null = null;
      try {
        await guest.write("hello pty\r\n");
        await pty.waitFor("hello pty\r\n", 10_000);
        // Raw mode: no echo, no newline mapping; the bytes reach the guest as typed.
        pty.send("from the pty\r");
        await guest.readUntil("from the pty\r");
        assert.equal(pty.text, "hello pty\r\n", "no echo");
        // A socket client sees the same port.
        unix = await AttachClient.connect(`${sock}.console`);
        await unix.waitFor("hello pty\r\n", 10_000);
        await unix.send("from the socket\n");
        await guest.readUntil("from the socket\n");
        if (guest.driver) {
          // A size set on the pty (as a terminal emulator does) reaches the guest with the next
          // input from it.
          setWindowSize(pty.fd, 132, 40);
          pty.send("k");
          const r = guest.driver.waitControl((c) => c.event === ControlEvent.RESIZE && c.id === 0);
          const dv = new DataView(r.extra.buffer, r.extra.byteOffset);
          // The first RESIZE came with the handshake (80x24); wait for the new one.
          const sizes = [[dv.getUint16(0, true), dv.getUint16(2, true)]];
          if (sizes[0][0] !== 40) {
            const r2 = guest.driver.waitControl((c) =>
              c.event === ControlEvent.RESIZE && c.id === 0 &&
              new DataView(c.extra.buffer, c.extra.byteOffset).getUint16(0, true) === 40
            );
            const dv2 = new DataView(r2.extra.buffer, r2.extra.byteOffset);
            sizes.push([dv2.getUint16(0, true), dv2.getUint16(2, true)]);
          }
          assert.deepEqual(sizes.at(-1), [40, 132], "rows, cols");
          assert.deepEqual(guest.driver.config().cols, 132);
        }
      } finally {
        pty.close();
        await unix?.close();
        await guest.close();
      }
    });
  });

  Deno.test(`console attach stdio (${mode}): the daemon's stdin and stdout both ways`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "vhostd-conattach-" });
    const sock = `${dir}/con.sock`;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", MAIN, "console", "--socket", sock, ...modeArgs, "--attach", "stdio"],
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    let out = "", err = "";
    const dec = new TextDecoder();
    const pumps = [
      (async () => {
        for await (const c of child.stdout) out += dec.decode(c, { stream: true });
      })(),
      (async () => {
        for await (const c of child.stderr) err += dec.decode(c, { stream: true });
      })(),
    ];
    const waitOut = async (text: string) => {
      const end = Date.now() + 30_000;
      while (!out.includes(text)) {
        if (Date.now() > end) throw new Error(`stdout never got ${text}:\n${out}\n${err}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    };
    const stdin = child.stdin.getWriter();
    let guest: Guest | null = null;
    let stdinOpen = true;
    try {
      await waitOut("vhostd: serving");
      assert.match(out, /port 0 console:(?: chardev \S+,)? attach \S+, stdio,/);
      guest = await connectGuest(sock, chardev, 1);
      await guest.write("to stdout\r\n");
      await waitOut("to stdout\r\n");
      await stdin.write(enc.encode("from stdin\n"));
      await guest.readUntil("from stdin\n");
      // The end of stdin stops input only; output still goes to stdout.
      await stdin.close();
      stdinOpen = false;
      await guest.write("after eof\r\n");
      await waitOut("to stdout\r\nafter eof\r\n");
    } finally {
      await guest?.close();
      if (stdinOpen) await stdin.close().catch(() => {});
      try {
        child.kill("SIGTERM");
      } catch {
        // already gone
      }
      const status = await child.status;
      await Promise.all(pumps);
      await Deno.remove(dir, { recursive: true });
      assert.equal(status.code, 0, err);
    }
  });
}

Deno.test("console attach: non-loopback TCP is refused without the flag; bad modes are usage errors", async () => {
  const cases: [string[], RegExp][] = [
    [["--attach", "tcp:0.0.0.0:0"], /only the token keeps them out.*--attach-any-address/],
    [["--attach", "tcp:[::]:0"], /only the token keeps them out.*--attach-any-address/],
    [["--attach", "tcp:192.0.2.1:4000"], /only the token keeps them out.*--attach-any-address/],
    [["--attach", "tcp:127.0.0.1:70000"], /port must be 0-65535/],
    [["--attach", "tcp:example.com:80"], /HOST must be/],
    [["--attach", "tcp:::1:80"], /must be unix:PATH, tcp:\[HOST:\]PORT, pty or stdio/],
    [["--attach", "serial"], /must be unix:PATH, tcp:\[HOST:\]PORT, pty or stdio/],
    [["--name", "agent", "--attach", "pty", "--attach", "stdio"], /port 0 \(the console\) only/],
    [["--name", "agent", "--attach", "tcp:4000", "--attach", "tcp:localhost:4000"], /two ports/],
    // The test's stdin is /dev/null here: stdio wants a terminal or a pipe.
    [["--attach", "stdio"], /stdin to be a terminal or a pipe/],
  ];
  const dir = await Deno.makeTempDir({ prefix: "vhostd-conattach-" });
  try {
    for (const [args, want] of cases) {
      const r = await runVhostd(["console", "--socket", `${dir}/con.sock`, ...args]);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, /^vhostd console: /);
      assert.match(r.stderr, want);
      assert.deepEqual([...Deno.readDirSync(dir)], [], "nothing left behind");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  // With the flag the address is accepted (checked without binding: tests stay on loopback).
  const any = parseAttach("tcp:0.0.0.0:4000", "/s", "console", true, "--attach-any-address");
  assert.deepEqual([any.unix, any.tcp?.port, [...any.tcp!.addr.bytes]], [null, 4000, [0, 0, 0, 0]]);
  const v6 = parseAttach("tcp:[::1]:0", "/s", "console", false, "--attach-any-address");
  assert.equal(v6.tcp?.addr.family, 6);
});

Deno.test("run --config: a console's attach list (tcp and pty); bad entries name the field", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-conattach-" });
  const config = `${dir}/vm.json`;
  const write = (attach: unknown, extra: Record<string, unknown> = {}) =>
    Deno.writeTextFileSync(
      config,
      JSON.stringify({
        name: "vmc",
        socketDir: dir,
        devices: [
          { type: "blk", id: "disk", image: `${dir}/disk.img` },
          { type: "console", id: "con", names: ["agent"], attach, ...extra },
        ],
      }),
    );
  sparseFile(`${dir}/disk.img`, 1 << 20);
  const sock = `${dir}/con.sock`;
  try {
    for (
      const [attach, want] of [
        [["stdio"], /^vhostd run: devices\[1\]\.attach\[0\]: stdio is for `vhostd console`/],
        [["tcp:10.1.2.3:0"], /^vhostd run: devices\[1\]\.attach\[0\]: .*"attachAnyAddress": true/],
        [
          ["tcp:127.0.0.1:0"],
          /^vhostd run: devices\[1\]\.attach\[0\]: .*needs a token.*"attachTokenFile"/,
        ],
        [["pty", "pty", "pty"], /^vhostd run: devices\[1\]\.attach: has 3 entries for 2 port/],
        [[7], /^vhostd run: devices\[1\]\.attach\[0\]: must be a string/],
      ] as [unknown[], RegExp][]
    ) {
      write(attach);
      const r = await runVhostd(["run", "--config", config]);
      assert.equal(r.code, 2, r.stderr);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
      assert.match(r.stderr, want);
    }

    const token = writeTokenFile(`${dir}/token`);
    write(["tcp:127.0.0.1:0", "pty"], { attachTokenFile: `${dir}/token` });
    const d = await DaemonProcess.start(["run", "--config", config]);
    let driver: ConsoleDriver | null = null;
    let client: AttachClient | null = null;
    let pty: PtyClient | null = null;
    try {
      const m = /attach console tcp 127\.0\.0\.1:(\d+); agent \S+, pty \/dev\/pts\/\d+/.exec(
        d.stdout,
      );
      assert.ok(m, d.stdout);
      driver = await ConsoleDriver.connect(sock, { ports: 2 });
      driver.handshake(2);
      driver.sendControl(0, ControlEvent.PORT_OPEN, 1);
      driver.sendControl(1, ControlEvent.PORT_OPEN, 1);
      client = await AttachClient.connectTcp(Number(m[1]), token);
      pty = new PtyClient(`${sock}.agent.pty`);
      driver.write(0, enc.encode("console out\n"));
      driver.write(1, enc.encode("agent out\n"));
      await client.waitFor("console out\n", 10_000);
      await pty.waitFor("agent out\n", 10_000);
      await client.send("console in\n");
      pty.send("agent in\n");
      assert.equal(driver.readUntil(0, "console in\n", 10_000), "console in\n");
      assert.equal(driver.readUntil(1, "agent in\n", 10_000), "agent in\n");
    } finally {
      pty?.close();
      await client?.close();
      driver?.close();
      assert.equal(await d.stop(), 0, d.stderr);
    }
    assert.equal(exists(`${sock}.agent.pty`), false, "the pty link is removed on exit");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
