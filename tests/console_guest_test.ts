/**
 * The console server against real guests:
 * - vhost-user mode on QEMU 11.1 (`vhost-user-test-device-pci`, from the chroot that
 *   tests/guest/build-qemu11.sh builds): a shell on /dev/hvc0 driven through the attach socket,
 *   and a named port at /dev/virtio-ports/agent carrying data both ways;
 * - character-device mode on the host's QEMU 7.2 (QEMU's own virtconsole): the guest's console
 *   output lands in the log.
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";
import { AttachClient } from "./helpers/attach.ts";
import {
  assertGuestSuccess,
  describeGuestRun,
  ensureQemu11,
  parseResults,
  runGuest,
} from "./guest/qemu.ts";

/** Makes /dev/virtio-ports/NAME links as udev would (the test kernel has no udev). */
const PORT_LINKS = `
for i in $(seq 100); do [ -e /dev/hvc0 ] && [ -e /sys/class/virtio-ports/vport0p1/name ] && break; sleep 0.1; done
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  n=$(cat "$p/name" 2>/dev/null)
  [ -n "$n" ] && ln -sf "/dev/$(basename "$p")" "/dev/virtio-ports/$n"
done
`;

Deno.test("guest (QEMU 11.1, vhost-user): a shell on hvc0 through the attach socket, and a named port", async () => {
  const qemu = await ensureQemu11();
  const dir = await Deno.makeTempDir({ prefix: "vhostd-con-" });
  const sock = `${dir}/con.sock`;
  const d = await DaemonProcess.start(["console", "--socket", sock, "--name", "agent"]);
  const clients: AttachClient[] = [];
  try {
    const con = await AttachClient.connect(`${sock}.console`);
    const agent = await AttachClient.connect(`${sock}.agent`);
    clients.push(con, agent);
    // The host side of the conversation, run while the guest boots and waits.
    const host = (async () => {
      await agent.waitFor("from-guest\n", 120_000);
      await agent.send("to-guest\n");
      await con.waitFor("SHELL-READY", 120_000);
      await con.send("echo answer-$((6*7))\n");
      await con.waitFor(/answer-42\r?\n/);
      await con.send("echo done > /tmp/done\n");
    })();
    host.catch(() => {});
    const r = await runGuest({
      qemuBinary: qemu,
      timeoutMs: 150_000,
      extraArgs: [
        "-chardev",
        `socket,id=vcon0,path=${sock}`,
        "-device",
        "vhost-user-test-device-pci,chardev=vcon0,virtio-id=3,num_vqs=6,config_size=12",
      ],
      script: `${PORT_LINKS}
echo "RESULT hvc0=$([ -c /dev/hvc0 ] && echo yes)"
echo "RESULT agent=$(readlink /dev/virtio-ports/agent)"
echo from-guest > /dev/virtio-ports/agent
read -r line < /dev/virtio-ports/agent
echo "RESULT agent_in=$line"
setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1' &
sleep 0.5
echo SHELL-READY > /dev/hvc0
for i in $(seq 600); do [ -f /tmp/done ] && break; sleep 0.1; done
echo "RESULT done=$(cat /tmp/done 2>/dev/null)"
`,
    });
    assertGuestSuccess(r);
    await host;
    const res = parseResults(r.console, "RESULT ");
    const why = describeGuestRun(r);
    assert.equal(res.hvc0, "yes", why);
    assert.match(res.agent ?? "", /^\/dev\/vport\d+p1$/, why);
    assert.equal(res.agent_in, "to-guest", why);
    assert.equal(res.done, "done", `the command typed into hvc0 ran\n${why}`);
    // Everything the guest printed on hvc0 is in the console log too.
    const log = await Deno.readTextFile(`${sock}.console.log`);
    assert.match(log, /answer-42/);
    assert.match(await Deno.readTextFile(`${sock}.agent.log`), /^from-guest\n/);
  } finally {
    for (const c of clients) await c.close();
    try {
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("guest (QEMU 7.2, character device): console output lands in the log", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-conchr-" });
  const sock = `${dir}/con.sock`;
  const logFile = `${dir}/console.log`;
  const d = await DaemonProcess.start(["console", "--chardev", "--socket", sock, "--log", logFile]);
  try {
    const r = await runGuest({
      extraArgs: [
        "-device",
        "virtio-serial-pci",
        "-chardev",
        `socket,id=vc0,path=${sock},reconnect=1`,
        "-device",
        "virtconsole,chardev=vc0",
      ],
      script: `
for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done
echo "hello from the guest $((6*7))" > /dev/hvc0
sleep 0.2
echo "RESULT wrote=yes"
`,
    });
    assertGuestSuccess(r);
    assert.equal(parseResults(r.console, "RESULT ").wrote, "yes", describeGuestRun(r));
    // The server writes the log as the bytes arrive; allow QEMU's last flush to land.
    let log = "";
    for (let i = 0; i < 50 && !log.includes("hello from the guest 42"); i++) {
      log = await Deno.readTextFile(logFile);
      await new Promise((res) => setTimeout(res, 100));
    }
    assert.match(log, /hello from the guest 42/);
  } finally {
    try {
      assert.equal(await d.stop(), 0, d.stderr);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});
