/**
 * `/metrics` and `status` of real daemons under real I/O, played by the project's front-end:
 *
 * - a disk's reads and writes are counted apart (requests, data bytes, latency histogram), by
 *   both I/O engines (synchronous, and io_uring with --direct); flushes are neither;
 * - a switch's and a TAP device's drops are exported, by direction and reason, and count the
 *   frames really dropped;
 * - every series carries the `vm` label (`--vm`), `vhostd_build_info` and the process metrics are
 *   there and plausible, and the exposition passes a strict format check;
 * - `status` (text and --json) gives vhostd's version; a net device shows type `net` and logs
 *   under its own name.
 */

import assert from "node:assert/strict";
import { DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";
import { BlkFrontend } from "../vhost-user/frontend/blk_frontend.ts";
import { NetDriver } from "../vhost-user/frontend/net_driver.ts";
import { BlkStatus } from "../devices/blk/device.ts";
import { requestStatus } from "../daemon/control.ts";
import { BROADCAST, mac, readUntil, tagged } from "./helpers/switch.ts";
import { linkExists, run } from "./helpers/net.ts";

const VERSION: string = JSON.parse(
  Deno.readTextFileSync(new URL("../deno.json", import.meta.url)),
).version;

/** One sample of an exposition. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/**
 * Parses the Prometheus text format (0.0.4) strictly, throwing at the first fault: every sample
 * belongs to a family declared once with HELP and TYPE before its samples, a family's samples are
 * together, names and labels are well formed, no series appears twice, and a histogram's buckets
 * are cumulative, end with `+Inf`, and agree with `_count`.
 */
function parseExposition(text: string): Sample[] {
  assert.ok(text.endsWith("\n"), "the exposition ends with a newline");
  const types = new Map<string, string>();
  const helped = new Set<string>();
  const closed = new Set<string>();
  const seen = new Set<string>();
  const samples: Sample[] = [];
  let current = "";
  const familyOf = (name: string) => {
    for (const suffix of ["_bucket", "_sum", "_count"]) {
      const base = name.slice(0, -suffix.length);
      if (name.endsWith(suffix) && types.get(base) === "histogram") return base;
    }
    return name;
  };
  for (const line of text.slice(0, -1).split("\n")) {
    const meta = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.+)$/.exec(line);
    if (meta) {
      const [, kind, name, rest] = meta;
      if (kind === "HELP") {
        assert.ok(!helped.has(name), `HELP ${name} twice`);
        helped.add(name);
      } else {
        assert.ok(!types.has(name), `TYPE ${name} twice`);
        assert.match(rest, /^(counter|gauge|histogram|summary|untyped)$/, line);
        types.set(name, rest);
      }
      assert.ok(!closed.has(name), `${name} declared again after its samples`);
      continue;
    }
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$/.exec(line);
    assert.ok(m, `not a sample line: ${JSON.stringify(line)}`);
    const [, name, labelText, valueText] = m;
    const family = familyOf(name);
    assert.ok(types.has(family) && helped.has(family), `${name} without HELP and TYPE first`);
    if (family !== current) {
      assert.ok(!closed.has(family), `the samples of ${family} are not together`);
      if (current) closed.add(current);
      current = family;
    }
    const labels: Record<string, string> = {};
    const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)/y;
    let at = 0;
    while (at < labelText.length) {
      labelRe.lastIndex = at;
      const l = labelRe.exec(labelText);
      assert.ok(l, `bad labels in ${line}`);
      assert.ok(!(l[1] in labels), `label ${l[1]} twice in ${line}`);
      labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => c === "n" ? "\n" : c);
      at = labelRe.lastIndex;
    }
    assert.ok(valueText === "+Inf" || !Number.isNaN(Number(valueText)), `bad value in ${line}`);
    const key = `${name}${JSON.stringify(Object.entries(labels).sort())}`;
    assert.ok(!seen.has(key), `series twice: ${line}`);
    seen.add(key);
    samples.push({ name, labels, value: Number(valueText) });
  }
  // Histograms: per series, cumulative buckets ending in +Inf equal to _count.
  for (const [family, type] of types) {
    if (type !== "histogram") continue;
    const groups = new Map<string, Sample[]>();
    for (const s of samples.filter((s) => s.name === `${family}_bucket`)) {
      const { le: _, ...rest } = s.labels;
      const k = JSON.stringify(rest);
      groups.set(k, [...groups.get(k) ?? [], s]);
    }
    const le = (s: Sample) => s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    for (const [k, buckets] of groups) {
      for (let i = 1; i < buckets.length; i++) {
        assert.ok(le(buckets[i]) > le(buckets[i - 1]), `le order ${k}`);
        assert.ok(buckets[i].value >= buckets[i - 1].value, `${family} not cumulative: ${k}`);
      }
      assert.equal(buckets.at(-1)!.labels.le, "+Inf", `${family} ${k} ends with +Inf`);
      const count = samples.find((s) =>
        s.name === `${family}_count` && JSON.stringify(s.labels) === k
      );
      assert.equal(count?.value, buckets.at(-1)!.value, `${family}_count of ${k}`);
    }
  }
  return samples;
}

/** The value of the one sample `name` whose labels include `labels`. */
function value(samples: Sample[], name: string, labels: Record<string, string>): number {
  const found = samples.filter((s) =>
    s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)
  );
  assert.equal(found.length, 1, `one ${name} ${JSON.stringify(labels)}, found ${found.length}`);
  return found[0].value;
}

/** Starts a daemon with metrics on a free port; returns it and a scraper. */
async function startWithMetrics(
  args: string[],
): Promise<{ d: DaemonProcess; scrape: () => Promise<Sample[]> }> {
  const d = await DaemonProcess.start([...args, "--metrics", "127.0.0.1:0"]);
  await d.waitFor(() => /metrics on http:\/\/127\.0\.0\.1:\d+/.test(d.stderr), 10_000, "metrics");
  const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(d.stderr)![1];
  return {
    d,
    scrape: async () => {
      const res = await fetch(`http://127.0.0.1:${port}/metrics`);
      assert.equal(res.status, 200);
      return parseExposition(await res.text());
    },
  };
}

/** Checks the labels and metrics every scrape of a daemon named `vm` must have. */
function assertDaemonMetrics(samples: Sample[], vm: string, pid: number): void {
  for (const s of samples) assert.equal(s.labels.vm, vm, `vm label of ${JSON.stringify(s)}`);
  assert.equal(
    value(samples, "vhostd_build_info", { version: VERSION, deno: Deno.version.deno }),
    1,
  );
  const rss = value(samples, "process_resident_memory_bytes", {});
  const statm = Deno.readTextFileSync(`/proc/${pid}/statm`).split(" ");
  const rssNow = Number(statm[1]) * 4096;
  assert.ok(rss > 10e6 && Math.abs(rss - rssNow) < 0.5 * rssNow, `RSS ${rss}, now ${rssNow}`);
  const cpu = value(samples, "process_cpu_seconds_total", {});
  assert.ok(cpu > 0 && cpu < 3600, `CPU ${cpu} s`);
  const fds = value(samples, "process_open_fds", {});
  const fdsNow = [...Deno.readDirSync(`/proc/${pid}/fd`)].length;
  assert.ok(Math.abs(fds - fdsNow) <= 3, `${fds} open fds, now ${fdsNow}`);
  assert.ok(value(samples, "process_max_fds", {}) >= fds);
  const start = value(samples, "process_start_time_seconds", {});
  assert.ok(Math.abs(Date.now() / 1000 - start) < 600, `start time ${start}`);
}

/** Scrapes until `ready` holds for the samples (latencies are recorded when a batch ends). */
async function scrapeUntil(
  scrape: () => Promise<Sample[]>,
  ready: (s: Sample[]) => boolean,
): Promise<Sample[]> {
  for (let i = 0;; i++) {
    const s = await scrape();
    if (ready(s) || i === 100) return s;
    await new Promise((r) => setTimeout(r, 50));
  }
}

for (const engine of ["sync", "io_uring"]) {
  Deno.test({
    name: `metrics: a disk's reads and writes are counted apart (${engine}); vm, build and ` +
      "process metrics; status gives the version",
    sanitizeResources: false,
    async fn() {
      await withDir("vhostd-metrics-", async (dir) => {
        const image = `${dir}/disk.img`;
        sparseFile(image, 16 << 20);
        const socket = `${dir}/blk.sock`;
        const control = `${dir}/control.sock`;
        const { d, scrape } = await startWithMetrics([
          "blk",
          "--socket",
          socket,
          "--image",
          image,
          "--queues",
          "2",
          "--vm",
          "vm-disk",
          "--control",
          control,
          ...(engine === "io_uring" ? ["--direct"] : ["--io-engine", "sync"]),
        ]);
        try {
          const s = await BlkFrontend.open({ socket, queues: 2 });
          try {
            // 5 writes of 8 KiB and 3 of 4 KiB; 7 reads of 4 KiB, 2 of 16 KiB and one past the
            // end of the disk (a read, failed: no bytes); 2 flushes (neither).
            for (let i = 0; i < 5; i++) {
              assert.equal(s.blk.write(16 * i, new Uint8Array(8192).fill(i), 0).status, 0);
            }
            for (let i = 0; i < 3; i++) {
              assert.equal(s.blk.write(200 + 8 * i, new Uint8Array(4096).fill(9), 1).status, 0);
            }
            for (let i = 0; i < 7; i++) assert.equal(s.blk.read(8 * i, 4096, i % 2).status, 0);
            for (let i = 0; i < 2; i++) assert.equal(s.blk.read(64 * i, 16384, 1).status, 0);
            assert.equal(s.blk.read(1 << 30, 4096, 0).status, BlkStatus.IOERR);
            for (const q of [0, 1]) assert.equal(s.blk.flush(q).status, 0);
            const dev = { device: "blk" };
            const read = { ...dev, direction: "read" };
            const write = { ...dev, direction: "write" };
            const samples = await scrapeUntil(
              scrape,
              (m) =>
                value(m, "vhostd_io_latency_seconds_count", read) === 10 &&
                value(m, "vhostd_io_latency_seconds_count", write) === 8,
            );
            assert.equal(value(samples, "vhostd_io_requests_total", read), 10);
            assert.equal(value(samples, "vhostd_io_requests_total", write), 8);
            assert.equal(value(samples, "vhostd_io_bytes_total", read), 7 * 4096 + 2 * 16384);
            assert.equal(value(samples, "vhostd_io_bytes_total", write), 5 * 8192 + 3 * 4096);
            for (const l of [read, write]) {
              assert.equal(
                value(samples, "vhostd_io_latency_seconds_count", l),
                l === read ? 10 : 8,
              );
              const sum = value(samples, "vhostd_io_latency_seconds_sum", l);
              assert.ok(sum > 0 && sum < 60, `${l.direction} latency sum ${sum}`);
              // Nothing took under a microsecond.
              assert.equal(
                value(samples, "vhostd_io_latency_seconds_bucket", { ...l, le: "0.000001" }),
                0,
              );
            }
            // The per-queue requests still include the flushes (and the failed read).
            const requests = samples.filter((m) => m.name === "vhostd_queue_requests_total")
              .reduce((a, m) => a + m.value, 0);
            assert.equal(requests, 10 + 8 + 2);
            assertDaemonMetrics(samples, "vm-disk", d.child.pid);

            const report = await requestStatus(control);
            assert.equal(report.version, VERSION);
            assert.equal(report.name, "vm-disk");
            const text = await runVhostd(["status", "--control", control]);
            assert.equal(text.code, 0, text.stderr);
            assert.match(
              text.stdout,
              new RegExp(`^vm-disk: vhostd ${VERSION.replace(/\./g, "\\.")}, pid`),
            );
            const json = await runVhostd(["status", "--control", control, "--json"]);
            assert.equal(JSON.parse(json.stdout).version, VERSION);
          } finally {
            s.close();
          }
        } finally {
          assert.equal(await d.stop(), 0, d.stderr);
        }
      });
    },
  });
}

Deno.test({
  name: "metrics: a switch exports its drops by port, direction and reason",
  sanitizeResources: false,
  async fn() {
    await withDir("vhostd-metrics-", async (dir) => {
      const socks = [`${dir}/p0.sock`, `${dir}/p1.sock`, `${dir}/p2.sock`];
      const { d, scrape } = await startWithMetrics([
        "switch",
        ...socks.flatMap((s) => ["--socket", s]),
        "--vm",
        "vm-net",
      ]);
      const drivers: NetDriver[] = [];
      try {
        for (const s of socks) drivers.push(await NetDriver.connect(s));
        const [a, b, c] = drivers;
        a.send(tagged(BROADCAST, mac(1), "a-hello"));
        readUntil(b, "a-hello");
        readUntil(c, "a-hello");
        // Port 1 sends 6 frames from port 0's address and 4 from a group address: 10 dropped.
        for (let i = 0; i < 6; i++) b.send(tagged(mac(3), mac(1), `spoof-${i}`));
        const group = new Uint8Array([0x01, 0x00, 0x5e, 0, 0, 1]);
        for (let i = 0; i < 4; i++) b.send(tagged(mac(3), group, `group-${i}`));
        // Port 2's driver goes: the 3 broadcasts that follow find no one there.
        c.close();
        drivers.pop();
        for (let i = 0; i < 3; i++) a.send(tagged(BROADCAST, mac(1), `lost-${i}`));
        b.send(tagged(BROADCAST, mac(2), "barrier"));
        readUntil(a, "barrier");
        const samples = await scrape();
        const dropped = (device: string, direction: string, reason: string) =>
          value(samples, "vhostd_net_dropped_total", { device, direction, reason });
        assert.equal(dropped("switch.1", "tx", "spoofed"), 10);
        assert.equal(dropped("switch.0", "tx", "spoofed"), 0);
        assert.equal(dropped("switch.1", "tx", "mac_limit"), 0);
        assert.equal(dropped("switch.2", "rx", "undeliverable"), 4, "3 lost and the barrier");
        assert.equal(dropped("switch.0", "rx", "undeliverable"), 0);
        const frames = (device: string, direction: string) =>
          value(samples, "vhostd_net_frames_total", { device, direction });
        assert.equal(frames("switch.0", "tx"), 4);
        assert.equal(frames("switch.1", "tx"), 11);
        assert.equal(frames("switch.0", "rx"), 1);
        assertDaemonMetrics(samples, "vm-net", d.child.pid);
      } finally {
        for (const drv of drivers) drv.close();
        assert.equal(await d.stop(), 0, d.stderr);
      }
    });
  },
});

Deno.test({
  name: "metrics: a TAP device exports its drops; it logs under its name; status types it net",
  sanitizeResources: false,
  async fn() {
    const tap = `vhm${Math.random().toString(36).slice(2, 8)}`;
    await withDir("vhostd-metrics-", async (dir) => {
      const socket = `${dir}/net.sock`;
      const control = `${dir}/control.sock`;
      const { d, scrape } = await startWithMetrics([
        "net",
        "--socket",
        socket,
        "--tap",
        tap,
        "--vm",
        "vm-tap",
        "--control",
        control,
        "--log-format",
        "json",
      ]);
      try {
        const drv = await NetDriver.connect(socket);
        try {
          // 5 frames with nothing behind the header, and 2 the TAP refuses while it is down: 7
          // dropped; 3 once it is up: sent.
          for (let i = 0; i < 5; i++) drv.send(new Uint8Array(0));
          for (let i = 0; i < 2; i++) drv.send(tagged(BROADCAST, mac(1), `down-${i}`));
          await run("ip", "link", "set", tap, "up");
          for (let i = 0; i < 3; i++) drv.send(tagged(BROADCAST, mac(1), `up-${i}`));
          const samples = await scrape();
          const pair = { device: "net0", queue_pair: "0" };
          assert.equal(
            value(samples, "vhostd_net_dropped_total", {
              ...pair,
              direction: "tx",
              reason: "unsent",
            }),
            7,
          );
          assert.equal(value(samples, "vhostd_net_frames_total", { ...pair, direction: "tx" }), 3);
          assertDaemonMetrics(samples, "vm-tap", d.child.pid);
          const report = await requestStatus(control);
          assert.equal(report.devices[0].name, "net0");
          assert.equal(report.devices[0].type, "net");
          const text = await runVhostd(["status", "--control", control]);
          assert.match(text.stdout, /^net0 +net +\//m, text.stdout);
        } finally {
          drv.close();
        }
        await d.waitFor(() => /guest acked/.test(d.stderr), 10_000, "the feature log line");
        const acked = d.stderr.split("\n").find((l) => l.includes("guest acked"))!;
        assert.equal(JSON.parse(acked).device, "net0", acked);
      } finally {
        assert.equal(await d.stop(), 0, d.stderr);
      }
      assert.ok(!(await linkExists(tap)), "the daemon's TAP went with it");
    });
  },
});

Deno.test("metrics: --vm takes a name like a config's, one line and exit 2 otherwise", async () => {
  for (const bad of ["", "a b", 'x"}', "-lead", "a".repeat(33), "vm\nevil"]) {
    const r = await runVhostd([
      "blk",
      "--socket",
      "/tmp/none.sock",
      "--image",
      "/dev/null",
      `--vm=${bad}`,
    ]);
    assert.equal(r.code, 2, r.stderr);
    assert.match(
      r.stderr.trim(),
      /^vhostd blk: --vm must be letters, digits, "\.", "_" or "-" \(at most 32\), not ".*"$/s,
    );
    assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
  }
  // run takes the config's name, not --vm.
  const r = await runVhostd(["run", "--config", "/dev/null", "--vm", "x"]);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /Unknown option '--vm'/);
});
