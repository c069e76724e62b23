/**
 * The "write your own device" example (examples/rng) against a real QEMU 7.2 guest, attached with
 * QEMU's stock `vhost-user-rng-pci`.
 */

import assert from "node:assert/strict";
import { DaemonProcess } from "./helpers/daemon.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";

const RNG = new URL("../examples/rng/main.ts", import.meta.url).pathname;

Deno.test("guest: the rng example feeds /dev/hwrng through vhost-user-rng-pci", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-rng-" });
  const sock = `${dir}/rng.sock`;
  const d = await DaemonProcess.start(["--socket", sock], undefined, false, RNG);
  try {
    const r = await runGuest({
      extraArgs: [
        "-chardev",
        `socket,id=rng0,path=${sock}`,
        "-device",
        "vhost-user-rng-pci,chardev=rng0",
      ],
      script: `
echo "RESULT current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/r bs=256 count=16 2>/dev/null
echo "RESULT bytes=$(wc -c < /tmp/r)"
echo "RESULT distinct=$(od -An -v -tx1 /tmp/r | tr ' ' '\\n' | grep . | sort -u | wc -l)"
`,
    });
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    assert.match(res.current ?? "", /^virtio_rng/, describeGuestRun(r));
    assert.equal(res.bytes, "4096", describeGuestRun(r));
    assert.ok(
      Number(res.distinct) > 200,
      `4 KiB of random bytes use most byte values: ${res.distinct}`,
    );
  } finally {
    assert.equal(await d.stop(), 0, d.stderr);
    await Deno.remove(dir, { recursive: true });
  }
});
