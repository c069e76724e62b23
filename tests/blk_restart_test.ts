/**
 * Restart without loss: a QEMU 7.2 guest writes with fio (crc32c verify) while the daemon is
 * killed with SIGKILL several times and restarted on the same socket. QEMU reconnects
 * (`reconnect=1`) and hands the new daemon the inflight buffer; fio must finish with no I/O and
 * no verify errors, and the guest kernel must never have seen an error.
 */

import assert from "node:assert/strict";
import { DaemonProcess, sparseFile } from "./helpers/daemon.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";

const MiB = 1 << 20;
const KILLS = 3;

for (const engine of ["sync", "io_uring"] as const) {
  Deno.test(`guest: fio verify survives the daemon being SIGKILLed and restarted (${engine})`, async () => {
    const dir = await Deno.makeTempDir({ prefix: "vhostd-restart-" });
    const img = `${dir}/disk.img`;
    const sock = `${dir}/blk.sock`;
    sparseFile(img, 256 * MiB);
    const args = ["blk", "--socket", sock, "--image", img];
    // With --direct the device uses io_uring, and many requests are in flight at each kill.
    if (engine === "io_uring") args.push("--direct");
    // A buffered image is served through io_uring too by default: the synchronous engine (the
    // fallback where io_uring cannot be set up) is asked for by name.
    else args.push("--io-engine", "sync");
    // The first daemon dies mid-request (SIGKILL after taking its 3000th request, before completing
    // it), so the restart must resubmit it; the later ones are killed at arbitrary moments.
    let daemon = await DaemonProcess.start(args, { VHOSTD_FAULT_KILL_AFTER: "3000" });
    const logs: string[] = [];
    let started = false;
    let guestDone = false;
    let guestPid = 0;
    let lastExit = -1;
    try {
      const guest = runGuest({
        vhostUserBlk: [{ socket: sock }],
        chardevReconnect: 1,
        timeoutMs: 300_000,
        onSpawn: (pid) => guestPid = pid,
        onConsole: (text) => {
          if (text.includes("FIO-START")) started = true;
        },
        script: `
echo FIO-START
fio --name=restart --filename=/dev/vda --rw=randwrite --bs=4k --size=96M --direct=1 \\
  --ioengine=libaio --iodepth=32 --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1
rc=$?
cat /tmp/fio.out
[ $rc -eq 0 ] && grep -q "err= 0" /tmp/fio.out && echo "RESULT fio=ok"
echo "RESULT kernel_errors=$(dmesg | grep -ciE 'I/O error|blk_update_request|timeout')"
`,
      });
      const guestRun = guest.finally(() => guestDone = true);
      const killer = (async () => {
        while (!started) await new Promise((r) => setTimeout(r, 100));
        for (let i = 0; i < KILLS; i++) {
          if (i === 0) await daemon.exit();
          else {
            await new Promise((r) => setTimeout(r, 1500));
            await daemon.stop("SIGKILL");
          }
          logs.push(daemon.stderr);
          daemon = await DaemonProcess.start(args);
        }
        // The last daemon serves the rest of the run. One that dies on its own fails the test at
        // once, saying when and how (137: SIGKILL), rather than leaving the guest to time out.
        const last = daemon;
        const code = await last.exit();
        if (!guestDone) {
          throw new Error(
            `the last daemon (pid ${last.child.pid}) exited on its own at ${
              new Date().toISOString()
            } with code ${code} while the guest still ran:\n${last.stderr}`,
          );
        }
      })();
      const r = await Promise.race([guestRun, killer.then(() => guestRun)]);
      assertGuestSuccess(r);
      const res = parseResults(r.console, "RESULT ");
      assert.equal(res.fio, "ok", describeGuestRun(r));
      assert.equal(res.kernel_errors, "0", describeGuestRun(r));
      assert.match(r.console, /write: IOPS=/, "fio really ran");
    } finally {
      // A guest still running here is one the test gave up on: it must not run on beside the
      // next tests until its own timeout.
      if (guestPid > 0 && !guestDone) {
        try {
          Deno.kill(guestPid, "SIGKILL");
        } catch {
          // gone
        }
      }
      lastExit = await daemon.stop();
      logs.push(daemon.stderr);
      await Deno.remove(dir, { recursive: true });
    }
    // Checked after the cleanup, so that it does not hide an error the run threw.
    assert.equal(lastExit, 0, daemon.stderr);
    const all = logs.join("\n");
    assert.equal(logs.length, KILLS + 1);
    const resubmitted = [...all.matchAll(/resubmitting (\d+) requests/g)].map((m) => Number(m[1]));
    console.log(
      `restarts: ${KILLS}; requests resubmitted after restarts: ${resubmitted.join(", ")}`,
    );
    assert.ok(
      resubmitted.length >= 1 && resubmitted[0] >= 1,
      `the taken request was resubmitted\n${all}`,
    );
    // Every restarted daemon was reconnected to by QEMU.
    assert.equal((all.match(/front-end connected/g) ?? []).length >= KILLS + 1, true, all);
  });
}
