/**
 * `vhostd run` serving one VM's two disks to a real QEMU 7.2 guest, while /metrics and `status`
 * show live counters. Nothing is mocked and nothing is skipped.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile } from "./helpers/daemon.ts";
import { assertGuestSuccess, describeGuestRun, parseResults, runGuest } from "./guest/qemu.ts";
import { requestStatus, type StatusReport } from "../daemon/control.ts";

const MiB = 1 << 20;

/** Sums a metric's samples whose labels match `labels` (a substring such as `device="a"`). */
function sum(metrics: string, name: string, labels: string): number {
  let total = 0;
  for (const line of metrics.split("\n")) {
    if (line.startsWith(`${name}{`) && line.includes(labels)) {
      total += Number(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return total;
}

Deno.test("guest: run --config serves two disks; /metrics and status show live counters", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-run-" });
  let d: DaemonProcess | null = null;
  try {
    sparseFile(`${dir}/a.img`, 64 * MiB);
    sparseFile(`${dir}/b.img`, 32 * MiB);
    const config = `${dir}/vm.json`;
    Deno.writeTextFileSync(
      config,
      JSON.stringify({
        name: "guestvm",
        socketDir: dir,
        metrics: "127.0.0.1:0",
        log: { format: "json" },
        devices: [
          { type: "blk", id: "a", image: `${dir}/a.img`, queues: 1 },
          { type: "blk", id: "b", image: `${dir}/b.img`, queues: 1, serial: "vm-b" },
        ],
      }),
    );
    d = await DaemonProcess.start(["run", "--config", config]);
    const daemon = d;
    await daemon.waitFor(() => /metrics on http/.test(daemon.stderr), 10_000, "metrics address");
    const port = Number(/"port":(\d+)/.exec(daemon.stderr)![1]);

    // While the guest sleeps after its I/O (front-ends still connected), read both endpoints.
    const probe: {
      live: Promise<{ metrics: string; status: StatusReport; table: string }> | null;
    } = {
      live: null,
    };
    const t0 = performance.now();
    const r = await runGuest({
      vhostUserBlk: [{ socket: `${dir}/a.sock` }, { socket: `${dir}/b.sock` }],
      timeoutMs: 120_000,
      script: `
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k oflag=direct 2>/dev/null || exit 10
dd if=/tmp/p of=/dev/vdb bs=64k seek=8 oflag=direct 2>/dev/null || exit 11
a=$(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
b=$(dd if=/dev/vdb bs=64k skip=8 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
p=$(sha256sum /tmp/p | cut -d' ' -f1)
[ "$a" = "$p" ] && [ "$b" = "$p" ] && echo "RESULT io=ok"
echo "RESULT serial=$(cat /sys/block/vdb/serial 2>/dev/null)"
echo IO-DONE
sleep 6
`,
      onConsole: (chunk) => {
        if (probe.live === null && chunk.includes("IO-DONE")) {
          probe.live = (async () => ({
            metrics: await (await fetch(`http://127.0.0.1:${port}/metrics`)).text(),
            status: await requestStatus(`${dir}/control.sock`),
            table: (await runVhostd(["status", "--config", config])).stdout,
          }))();
        }
      },
    });
    const guestMs = Math.round(performance.now() - t0);
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    assert.equal(res.io, "ok", describeGuestRun(r));
    assert.equal(res.serial, "vm-b", describeGuestRun(r));
    assert.ok(probe.live !== null, "the guest never printed IO-DONE");
    const { metrics, status, table } = await probe.live;

    // Metrics, per device, while the guest was connected.
    for (const dev of ["a", "b"]) {
      const l = `device="${dev}"`;
      assert.equal(sum(metrics, "vhostd_device_connected", l), 1, metrics);
      for (const name of ["requests_total", "bytes_total", "kicks_total", "interrupts_total"]) {
        assert.ok(sum(metrics, `vhostd_queue_${name}`, l) > 0, `${dev} ${name}\n${metrics}`);
      }
      assert.ok(sum(metrics, "vhostd_queue_latency_seconds_count", l) > 0, metrics);
      assert.ok(sum(metrics, "vhostd_queue_bytes_total", l) >= 2 * MiB, `${dev}: 1 MiB each way`);
      assert.equal(sum(metrics, "vhostd_queue_errors_total", l), 0, metrics);
      // The guest's 1 MiB written and read back, apart; every series names the VM.
      for (const direction of ["read", "write"]) {
        const d = `${l},direction="${direction}"`;
        assert.ok(sum(metrics, "vhostd_io_requests_total", d) > 0, `${dev} ${direction}s`);
        assert.ok(sum(metrics, "vhostd_io_bytes_total", d) >= MiB, `${dev}: 1 MiB ${direction}`);
        assert.ok(sum(metrics, "vhostd_io_latency_seconds_count", d) > 0, metrics);
      }
    }
    for (const line of metrics.split("\n").filter((l) => l !== "" && !l.startsWith("#"))) {
      assert.match(line, /^\w+\{vm="guestvm"[,}]/, "every series names the VM");
    }
    // Status: both front-ends are this QEMU, features negotiated, queue 0 running, counting.
    for (const dev of status.devices) {
      assert.ok(dev.frontEnd !== null && dev.frontEnd.pid > 0, JSON.stringify(dev));
      assert.notEqual(dev.ackedFeatures, "0x0");
      assert.equal(dev.status & 4, 4, "DRIVER_OK");
      const q0 = dev.queues[0];
      assert.ok(q0.started && q0.enabled && q0.size > 0, JSON.stringify(q0));
      assert.ok(q0.requests > 0 && q0.kicks > 0 && q0.interrupts > 0, JSON.stringify(q0));
    }
    assert.equal(status.devices[0].frontEnd!.pid, status.devices[1].frontEnd!.pid, "one QEMU");
    // Both disks on the daemon's one shared worker (the WORKER column).
    assert.match(table, /^a\s+blk\s+\S+a\.sock\s+1\s+pid \d+ uid \d+\s+0xf \(driver-ok\)/m, table);
    assert.match(table, /^b\s+blk\s+\S+b\.sock\s+1\s+pid \d+ uid \d+/m, table);
    assert.match(table, /^b\s+0\s+\d+\s+started,enabled\s+[1-9]\d*\s/m, table);

    assert.equal(await daemon.stop(), 0, daemon.stderr);
    // JSON logs: every line about a device names it.
    for (const line of daemon.stderr.trim().split("\n")) {
      const rec = JSON.parse(line);
      if (rec.logger === "vhostd.a" || rec.logger === "vhostd.b") {
        assert.equal(rec.device, rec.logger.slice(7), line);
      }
    }
    assert.doesNotMatch(daemon.stderr, /"level":"(ERROR|FATAL)"/, daemon.stderr);
    console.log(`guest run: ${guestMs} ms`);
  } finally {
    if (d) await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("guest: 8 vCPUs on a config that leaves queues out, attached as `run --check` prints", async () => {
  // QEMU gives a vhost-user-blk device one queue per vCPU unless num-queues says otherwise, and
  // refuses a back-end that offers fewer: the default must cover the guest, and the printed
  // line must work as it is.
  const dir = await Deno.makeTempDir({ prefix: "vhostd-run8-" });
  let d: DaemonProcess | null = null;
  try {
    sparseFile(`${dir}/a.img`, 16 * MiB);
    const config = `${dir}/vm.json`;
    Deno.writeTextFileSync(
      config,
      JSON.stringify({
        name: "smp8",
        socketDir: dir,
        devices: [{ type: "blk", id: "a", image: `${dir}/a.img`, serial: "smp8-a" }],
      }),
    );
    const check = await runVhostd(["run", "--config", config, "--check"]);
    assert.equal(check.code, 0, check.stderr);
    // The device's own lines of the banner, as an operator would paste them.
    const printed = [...check.stdout.matchAll(/^\s+(-chardev|-device) (\S+)/gm)]
      .flatMap((m) => [m[1], m[2]]);
    assert.equal(printed.length, 4, check.stdout);
    d = await DaemonProcess.start(["run", "--config", config]);
    const r = await runGuest({
      smp: 8,
      extraArgs: printed,
      timeoutMs: 600_000,
      script: `
echo "RESULT queues=$(ls /sys/block/vda/mq | wc -l)"
echo "RESULT serial=$(cat /sys/block/vda/serial)"
dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=64k oflag=direct 2>/dev/null || exit 10
a=$(dd if=/dev/vda bs=64k count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$a" = "$(sha256sum /tmp/p | cut -d' ' -f1)" ] && echo "RESULT io=ok"
`,
    });
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    assert.equal(res.serial, "smp8-a", describeGuestRun(r));
    assert.equal(res.io, "ok", describeGuestRun(r));
    // The guest spreads its requests over one queue per vCPU.
    assert.equal(res.queues, "8", describeGuestRun(r));
    assert.match(check.stdout, /-device vhost-user-blk-pci,chardev=a,num-queues=16$/m);
    assert.equal(await d.stop(), 0, d.stderr);
  } finally {
    if (d) await d.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
