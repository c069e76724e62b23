/**
 * The shipped examples boot together: examples/config/vm1.json served by `vhostd run` and
 * examples/libvirt/vm1.xml started by a real libvirtd (QEMU 7.2), changed only where this host
 * needs it. The guest reads its root disk's serial, writes and reads that disk, reads the
 * read-only data disk (and cannot write it), and pings the host over its vhost-user NIC. The
 * domain is started before vhostd: its start waits, libvirt's QEMU log names the missing socket,
 * and it goes on once vhostd serves.
 *
 * What the test changes, and nothing else:
 * - config: `socketDir` and the two `image` paths point into the test's folder. vhostd runs in a
 *   network namespace of the test, so its TAP (vm1-net0) and metrics address (127.0.0.1:61910)
 *   are private to it.
 * - XML, paths: the socket folder; the guest kit's kernel, initramfs and command line
 *   (`<os><kernel/><initrd/><cmdline/>`) instead of a boot loader on the root disk, which the
 *   test's blank image has not; a `<log file=.../>` on the serial port to read the console.
 * - XML, TCG (this host has no KVM): `<domain type='qemu'>`, `<cpu mode='maximum'/>`, and
 *   `vectors=0` on the NIC through `<qemu:override>`, as the XML's own comment describes.
 *
 * libvirtd is the one tests/helpers/libvirtd.ts starts, its state in the test's folder.
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { PrivateLibvirtd } from "./helpers/libvirtd.ts";
import { run, withNamespace } from "./helpers/net.ts";
import {
  ensureKit,
  EXIT_MARKER,
  guestExitStatus,
  parseResults,
  writeInitrd,
} from "./guest/qemu.ts";

const MiB = 1 << 20;
const EXAMPLES = new URL("../examples/", import.meta.url);
const DATA_MARKER = "vhostd-data-disk";
const ROOT_MARKER = "written-by-vm1";

/** The text of file `path`, or "" if it is not there (yet). */
function readOr(path: string): string {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return "";
  }
}

/** Replaces `from` in `text` by `to`, failing if the example no longer has `from`. */
function replace(text: string, from: string, to: string): string {
  assert.ok(text.includes(from), `the example no longer has ${from}`);
  return text.replaceAll(from, to);
}

const GUEST_SCRIPT = `
waitfor /dev/vda && waitfor /dev/vdb || exit 2
echo "RESULT serial=$(cat /sys/block/vda/serial)"
echo "RESULT vda_queues=$(ls /sys/block/vda/mq | wc -l)"
echo "RESULT vdb_queues=$(ls /sys/block/vdb/mq | wc -l)"
echo "RESULT vdb_ro=$(cat /sys/block/vdb/ro)"
echo "RESULT data=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c ${DATA_MARKER.length})"
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k seek=16 oflag=direct 2>/dev/null || exit 10
a=$(dd if=/dev/vda bs=64k skip=16 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$a" = "$(sha256sum /tmp/p | cut -d' ' -f1)" ] && echo "RESULT root_io=ok"
printf '${ROOT_MARKER}' | dd of=/dev/vda conv=fsync 2>/dev/null || exit 11
if dd if=/tmp/p of=/dev/vdb bs=64k count=1 oflag=direct 2>/dev/null; then
  echo "RESULT vdb_write=accepted"
else
  echo "RESULT vdb_write=refused"
fi
nic=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
echo "RESULT mac=$(cat /sys/class/net/$nic/address)"
ip addr add 198.18.190.2/24 dev "$nic" && ip link set "$nic" up
ping -c 3 -w 60 198.18.190.1 >/dev/null && echo "RESULT ping=ok"
`;

Deno.test("libvirt: the example XML and config boot a guest under a real libvirtd", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-libvirt-" });
  let libvirtd: PrivateLibvirtd | null = null;
  let vhostd: DaemonProcess | null = null;
  try {
    await withNamespace("vhdlv", async (ns) => {
      // The config, with the test's paths.
      const config = JSON.parse(Deno.readTextFileSync(new URL("config/vm1.json", EXAMPLES)));
      const sockets = `${dir}/sock`;
      Deno.mkdirSync(sockets);
      config.socketDir = sockets;
      for (const d of config.devices) {
        if (d.image === undefined) continue;
        d.image = `${dir}/${d.image.split("/").pop()}`;
        sparseFile(d.image, 32 * MiB);
      }
      const data = config.devices.find((d: { id: string }) => d.id === "data").image;
      const f = Deno.openSync(data, { write: true });
      f.writeSync(new TextEncoder().encode(DATA_MARKER));
      f.close();
      Deno.writeTextFileSync(`${dir}/vm1.json`, JSON.stringify(config));
      // The domain, with the test's paths and this host's TCG settings.
      const kit = await ensureKit();
      const initrd = `${dir}/initrd`;
      await writeInitrd({ script: GUEST_SCRIPT }, kit, initrd);
      const consoleLog = `${dir}/console.log`;
      let xml = Deno.readTextFileSync(new URL("libvirt/vm1.xml", EXAMPLES));
      xml = replace(xml, "/run/vhostd/vm1/", `${sockets}/`);
      xml = replace(
        xml,
        "<type arch='x86_64' machine='q35'>hvm</type>",
        `<type arch='x86_64' machine='q35'>hvm</type><kernel>${kit.kernel}</kernel>` +
          `<initrd>${initrd}</initrd><cmdline>console=ttyS0 panic=-1 quiet</cmdline>`,
      );
      xml = replace(
        xml,
        "<serial type='pty'>",
        `<serial type='pty'><log file='${consoleLog}' append='off'/>`,
      );
      xml = replace(
        xml,
        "<domain type='kvm'>",
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
      );
      xml = replace(xml, "<cpu mode='host-passthrough' />", "<cpu mode='maximum' />");
      xml = replace(
        xml,
        "</devices>",
        "</devices><qemu:override><qemu:device alias='net0'><qemu:frontend>" +
          "<qemu:property name='vectors' type='unsigned' value='0'/>" +
          "</qemu:frontend></qemu:device></qemu:override>",
      );
      Deno.writeTextFileSync(`${dir}/vm1.xml`, xml);

      Deno.mkdirSync(`${dir}/libvirt`);
      libvirtd = await PrivateLibvirtd.start(`${dir}/libvirt`);
      const lv = libvirtd;
      await lv.virsh("define", `${dir}/vm1.xml`);
      // Started before vhostd serves, the domain waits (paused, virsh start not returning), and
      // libvirt's QEMU log names the socket; once vhostd serves, QEMU connects and the start ends.
      const starting = lv.virshResult("start", "vm1");
      starting.catch(() => undefined); // awaited below; a failure before then is reported instead
      const waitingFor = `Failed to connect to '${sockets}/net0.sock'`;
      const waitDeadline = Date.now() + 180_000;
      while (!readOr(lv.qemuLogPath("vm1")).includes(waitingFor)) {
        assert.ok(Date.now() < waitDeadline, `vm1.log never said ${waitingFor}\n${lv.log()}`);
        await new Promise((r) => setTimeout(r, 500));
      }
      assert.equal((await lv.virshResult("domstate", "vm1")).output.trim(), "paused");
      vhostd = await DaemonProcess.startUnder(["ip", "netns", "exec", ns], [
        "run",
        "--config",
        `${dir}/vm1.json`,
      ]);
      const tap = config.devices.find((d: { type: string }) => d.type === "net").tap;
      await run("ip", "-n", ns, "addr", "add", "198.18.190.1/24", "dev", tap);
      await run("ip", "-n", ns, "link", "set", tap, "up");

      const started = await starting;
      assert.equal(started.code, 0, started.output + lv.log());
      // on_poweroff is destroy: the domain stops once the guest's script is done.
      const deadline = Date.now() + 600_000;
      let state = "";
      while (Date.now() < deadline) {
        state = (await lv.virshResult("domstate", "vm1")).output.trim();
        if (state === "shut off") break;
        await new Promise((r) => setTimeout(r, 1000));
      }
      const consoleText = Deno.readTextFileSync(consoleLog).replaceAll("\r\n", "\n");
      const report = `state: ${state}\n--- console ---\n${consoleText}\n${lv.log()}\n` +
        `--- vhostd ---\n${vhostd.stdout}${vhostd.stderr}`;
      assert.equal(state, "shut off", report);
      assert.ok(consoleText.includes(EXIT_MARKER), report);
      assert.equal(guestExitStatus(consoleText), 0, report);
      const res = parseResults(consoleText, "RESULT ");
      assert.equal(res.serial, "vm1-root", report);
      assert.equal(res.root_io, "ok", report);
      assert.equal(res.data, DATA_MARKER, report);
      assert.equal(res.vdb_ro, "1", report);
      assert.equal(res.vdb_write, "refused", report);
      // queues='2' on the root disk; the data disk takes QEMU's one per vCPU (2).
      assert.equal(res.vda_queues, "2", report);
      assert.equal(res.vdb_queues, "2", report);
      assert.equal(res.mac, "52:54:00:12:34:56", report);
      assert.equal(res.ping, "ok", report);
      const root = config.devices.find((d: { id: string }) => d.id === "root").image;
      const head = new TextDecoder().decode(
        Deno.readFileSync(root).subarray(0, ROOT_MARKER.length),
      );
      assert.equal(head, ROOT_MARKER, "the guest's write reached the root image");
      // libvirt logged QEMU's command line where the README says.
      assert.match(Deno.readTextFileSync(lv.qemuLogPath("vm1")), /vhost-user-blk-pci/);
      await lv.virsh("undefine", "vm1");
      assert.equal(await vhostd.stop(), 0, vhostd.stderr);
    });
  } finally {
    if (libvirtd) await (libvirtd as PrivateLibvirtd).stop();
    if (vhostd) await (vhostd as DaemonProcess).stop();
    await Deno.remove(dir, { recursive: true });
  }
});
