/**
 * Turns a benchmark result into Markdown tables and hand-written SVG bar charts.
 *
 * @module
 */

import type { BackendOnlyResult } from "./backend_only.ts";
import type { GuestFioResult } from "./guest_fio.ts";
import type { GuestIdleResult } from "./guest_idle.ts";
import type { MemoryCaseResult, MemoryResult } from "./memory.ts";
import type { MigrationResult } from "./migration.ts";
import type { NetResult } from "./net.ts";
import type { ScaleResult } from "./scale.ts";
import type { SharingResult } from "./sharing.ts";
import type { SystemInfo } from "./system.ts";
import { sig } from "./lib.ts";
import { describePlacement } from "./placement.ts";

/** Everything one `deno task bench` run produced. */
export interface BenchResult {
  /** Format version of this JSON. */
  schema: 1;
  /** `full` (medians of `runs`) or `quick` (a smoke run: not figures to quote). */
  mode: "full" | "quick";
  /** ISO time the run started. */
  startedAt: string;
  /** Wall seconds of the whole run. */
  durationSeconds: number;
  /** Wall seconds per comparison. */
  stepSeconds: Record<string, number>;
  /** The command that produced this. */
  command: string;
  /** Machine and versions. */
  system: SystemInfo;
  /** Comparison 1 (absent if it failed or was not selected). */
  backendOnly?: BackendOnlyResult;
  /** Comparison 2. */
  guestFio?: GuestFioResult;
  /** Comparison 2's idle guest: each back-end's CPU while the guest sleeps. */
  guestIdle?: GuestIdleResult;
  /** Comparison 3 (absent if not selected; a failed half is absent inside it). */
  net?: NetResult;
  /** Comparison 4. */
  memory?: MemoryResult;
  /** Comparison 4, scale: N idle daemons on one host. */
  scale?: ScaleResult;
  /** Comparison 4, sharing: two busy disks on one worker vs a worker each. */
  sharing?: SharingResult;
  /** Comparison 5. */
  migration?: MigrationResult;
  /** Steps that failed, one line each. */
  failures: string[];
  /** Comparisons selected for this run (`--only`). */
  only: string[];
}

/** One bar in a chart group. */
export interface Bar {
  /** Series (back-end) name; picks the colour. */
  series: string;
  /** Value (bars are scaled to the largest in the chart). */
  value: number;
}

/** A labelled group of bars (one case). */
export interface BarGroup {
  /** Case label shown at the left. */
  label: string;
  /** Bars in series order. */
  bars: Bar[];
}

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];

function esc(s: string): string {
  return s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

/** Formats a number for people: thousands separators, or 3 significant digits when small. */
export function fmt(x: number): string {
  if (!Number.isFinite(x)) return "–";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en-US");
  return String(Number(x.toPrecision(3)));
}

/** ` (min–max)` of several samples, to follow their median; nothing for one sample. */
function spread(xs: number[]): string {
  return xs.length > 1 ? ` (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})` : "";
}

/**
 * A horizontal grouped bar chart as a standalone SVG document: one group per case, one bar per
 * series, values written at the bar ends, a legend on top.
 */
export function barChart(
  title: string,
  unit: string,
  series: string[],
  groups: BarGroup[],
): string {
  const width = 760, labelW = 170, valueW = 90, barH = 16, gap = 12, top = 58;
  const plotW = width - labelW - valueW - 20;
  const max = Math.max(1e-12, ...groups.flatMap((g) => g.bars.map((b) => b.value)));
  const color = (s: string) => COLORS[Math.max(0, series.indexOf(s)) % COLORS.length];
  const out: string[] = [];
  let y = top;
  for (const g of groups) {
    const gh = g.bars.length * barH;
    out.push(
      `<text x="${labelW - 8}" y="${y + gh / 2 + 4}" text-anchor="end">${esc(g.label)}</text>`,
    );
    for (const b of g.bars) {
      const w = Math.max(1, (b.value / max) * plotW);
      out.push(
        `<rect x="${labelW}" y="${y}" width="${w.toFixed(1)}" height="${barH - 2}" ` +
          `fill="${color(b.series)}"><title>${
            esc(`${b.series}: ${fmt(b.value)} ${unit}`)
          }</title></rect>`,
        `<text x="${labelW + w + 4}" y="${y + barH - 5}" font-size="11">${
          esc(fmt(b.value))
        }</text>`,
      );
      y += barH;
    }
    y += gap;
  }
  const height = y + 10;
  const legend = series.map((s, i) =>
    `<rect x="${labelW + i * 150}" y="30" width="12" height="12" fill="${color(s)}"/>` +
    `<text x="${labelW + i * 150 + 16}" y="40">${esc(s)}</text>`
  ).join("");
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    `<text x="10" y="18" font-size="14" font-weight="bold">${esc(title)} (${esc(unit)})</text>`,
    legend,
    `<line x1="${labelW}" y1="${top - 4}" x2="${labelW}" y2="${height - 10}" stroke="#888"/>`,
    ...out,
    `</svg>`,
    "",
  ].join("\n");
}

/** SVG files for a result: file name (no directory) → content. */
export function charts(r: BenchResult, prefix: string): Record<string, string> {
  const files: Record<string, string> = {};
  const b = r.backendOnly;
  if (b) {
    const groups = (pick: (c: BackendOnlyResult["cases"][number]) => number): BarGroup[] => {
      const out: BarGroup[] = [];
      for (const storage of b.config.storages) {
        for (const shape of b.config.shapes) {
          const bars = b.config.backends.flatMap((be) => {
            const c = b.cases.find((x) =>
              x.storage === storage && x.shape === shape.label && x.backend === be
            );
            return c ? [{ series: be, value: pick(c) }] : [];
          });
          if (bars.length) out.push({ label: `${storage}, ${shape.label}`, bars });
        }
      }
      return out;
    };
    files[`${prefix}backend-iops.svg`] = barChart(
      "Back-end only, 4k random read",
      "IOPS, higher is better",
      b.config.backends,
      groups((c) => c.iops),
    );
    files[`${prefix}backend-cpu.svg`] = barChart(
      "Back-end CPU per I/O, 4k random read",
      "µs, lower is better",
      b.config.backends,
      groups((c) => c.cpuUsPerIo),
    );
  }
  const g = r.guestFio;
  if (g) {
    const groups = (pick: (c: GuestFioResult["cases"][number]) => number): BarGroup[] =>
      g.config.jobs.map((j) => ({
        label: j.name,
        bars: g.config.variants.flatMap((v) => {
          const c = g.cases.find((x) => x.job === j.name && x.variant === v);
          return c ? [{ series: v, value: pick(c) }] : [];
        }),
      })).filter((x) => x.bars.length > 0);
    const accel = g.accelerator.toUpperCase();
    files[`${prefix}guest-iops.svg`] = barChart(
      `Guest fio (${accel} guest)`,
      "IOPS, higher is better",
      g.config.variants,
      groups((c) => c.iops),
    );
    files[`${prefix}guest-cpu.svg`] = barChart(
      `Guest fio: back-end CPU per I/O (${accel})`,
      "µs, lower is better",
      g.config.variants,
      groups((c) => c.cpuUsPerIo),
    );
  }
  const n = r.net;
  if (n?.testpmd) {
    const t = n.testpmd;
    files[`${prefix}net-testpmd.svg`] = barChart(
      "testpmd txonly -> back-end -> testpmd rxonly, received",
      "Mpps, higher is better",
      n.config.backends,
      n.config.frameSizes.map((f) => ({
        label: `${f} B frames`,
        bars: n.config.backends.flatMap((be) => {
          const c = t.cases.find((x) => x.frameBytes === f && x.backend === be);
          return c ? [{ series: be, value: c.rxMpps }] : [];
        }),
      })).filter((g) => g.bars.length > 0),
    );
  }
  if (n?.iperf) {
    const i = n.iperf;
    files[`${prefix}net-iperf.svg`] = barChart(
      `Guest iperf3 TCP over a TAP (${i.accelerator.toUpperCase()} guest)`,
      "Gbit/s, higher is better",
      n.config.variants,
      (["guest-to-ns", "ns-to-guest"] as const).map((d) => ({
        label: d === "guest-to-ns" ? "guest -> namespace" : "namespace -> guest",
        bars: n.config.variants.flatMap((v) => {
          const c = i.cases.find((x) => x.direction === d && x.variant === v);
          return c ? [{ series: v, value: c.gbps }] : [];
        }),
      })).filter((g) => g.bars.length > 0),
    );
  }
  const m = r.memory;
  if (m) {
    const rss = (id: string) => m.cases.find((c) => c.id === id)?.memory.rssMiB;
    const bar = (series: string, value: number | undefined): Bar[] =>
      value === undefined ? [] : [{ series, value }];
    const t = m.targets;
    files[`${prefix}memory.svg`] = barChart(
      "Idle resident memory (RSS)",
      "MiB, lower is better",
      ["vhostd", "vhostd, a worker each", "qsd", "target"],
      [
        {
          label: "VM: 2 blk + net + console",
          bars: [
            ...bar("vhostd", rss("vm")),
            ...bar("vhostd, a worker each", rss("vm-own")),
            ...bar("target", t.vmMiB),
          ],
        },
        {
          label: "one blk device",
          bars: [...bar("vhostd", rss("blk-cli")), ...bar("qsd", rss("qsd")), {
            series: "target",
            value: t.oneBlkMiB,
          }],
        },
        ...m.config.deviceCounts.map((n) => ({
          label: `${n} blk device(s)`,
          bars: [
            ...bar("vhostd", rss(`run-blk-${n}`)),
            ...bar("vhostd, a worker each", rss(`run-blk-${n}-own`)),
          ],
        })),
        ...m.config.queueCounts.map((q) => ({
          label: `1 device, ${q} queue(s)`,
          bars: bar("vhostd", rss(`run-q-${q}`)),
        })),
      ].filter((g) => g.bars.length > 0),
    );
  }
  const sc = r.scale;
  if (sc) {
    files[`${prefix}scale.svg`] = barChart(
      "N idle daemons on one host: total PSS",
      "MiB, lower is better",
      ["vhostd", "qsd"],
      sc.config.counts.map((n) => ({
        label: `${n} daemon(s)`,
        bars: (["vhostd", "qsd"] as const).flatMap((be) => {
          const c = sc.cases.find((x) => x.backend === be && x.daemons === n);
          return c ? [{ series: be, value: c.totalPssMiB }] : [];
        }),
      })).filter((g) => g.bars.length > 0),
    );
  }
  const mig = r.migration;
  if (mig) {
    const variants = mig.summary.map((x) => x.variant);
    const bars = (pick: (x: MigrationResult["summary"][number]) => number) =>
      mig.summary.map((x) => ({ series: x.variant, value: pick(x) }));
    files[`${prefix}migration.svg`] = barChart(
      "Live migration of a guest with a busy disk",
      "ms, lower is better",
      variants,
      [
        { label: "total time", bars: bars((x) => x.totalTimeMs) },
        { label: "downtime", bars: bars((x) => x.downtimeMs) },
      ],
    );
  }
  return files;
}

function notRun(r: BenchResult, which: string): string {
  return r.only.includes(which)
    ? "Not measured: the step failed (see failed steps)."
    : `Not run in this invocation (\`--only ${r.only.join(",")}\`).`;
}

function table(head: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(" | ")} |`;
  return [line(head), line(head.map(() => "---")), ...rows.map(line)].join("\n");
}

function ratio(x: number, goodAtLeast: boolean, target = 1): string {
  if (!Number.isFinite(x)) return "–";
  const ok = goodAtLeast ? x >= target : x <= target;
  return `${ok ? "**" : ""}${fmt(x)}×${ok ? "**" : ""}`;
}

/**
 * The Markdown report. `chartDir` is where the SVGs are, relative to the Markdown file;
 * `prefix` is the SVG file-name prefix; `jsonPath` the raw results, relative too.
 */
export function markdown(
  r: BenchResult,
  chartDir: string,
  prefix: string,
  jsonPath: string,
): string {
  const s = r.system;
  const accel = s.accelerator.toUpperCase();
  const img = (name: string, alt: string) => `![${alt}](${chartDir}/${prefix}${name})`;
  const out: string[] = [];
  out.push("# Benchmarks", "");
  if (r.mode === "quick") {
    out.push(
      "**QUICK SMOKE RUN: one short run of each case, to check the harness works. These are not " +
        "figures to quote.**",
      "",
    );
  }
  out.push(
    `Generated by \`${r.command}\` on ${r.startedAt.slice(0, 10)} (${r.mode} mode; ` +
      (r.mode === "full" ? "every figure is the median of several runs" : "one run per case") +
      `; ${Math.round(r.durationSeconds / 60)} min). Raw data: [${jsonPath}](${jsonPath}). ` +
      `Re-run with \`deno task bench\` (about the same time) or \`deno task bench --quick\` ` +
      "(a smoke run).",
    "",
    `**Guests ran under ${accel}**${
      s.accelerator === "tcg"
        ? " (software emulation: the CPU shows neither vmx nor svm, so the guest's emulated CPU " +
          "is the bottleneck of comparison 2 and the back-end CPU per I/O is the figure to read)"
        : ""
    }.`,
    "",
    "## Machine",
    "",
    table(["", ""], [
      ["CPU", `${s.cpuModel}, ${s.nproc} CPUs (nproc), ${s.memoryGiB} GiB`],
      [
        "accelerator",
        `${accel}${s.hardwareVirtualization ? " (vmx/svm present)" : " (no vmx/svm)"}`,
      ],
      ["OS, kernel", `${s.os}, Linux ${s.kernel}`],
      ["QEMU", s.qemu],
      ["qemu-storage-daemon", s.qsd],
      ["Deno", s.deno],
      ["fio", s.fio],
      ["DPDK (testpmd, net_vhost, net_virtio_user)", s.dpdk || "–"],
      ["iperf3", s.iperf3 || "–"],
      ["guest kit", s.guestKit || "–"],
      ["load average (start / end)", `${s.loadavgStart} / ${s.loadavgEnd}`],
    ]),
    "",
  );
  const load1 = Number(s.loadavgStart.split(" ")[0]);
  if (load1 > 0.5) {
    out.push(
      `> The machine was not idle when the run started (1-minute load average ${load1}): other ` +
        "work shared the CPUs, so absolute figures are low and noisy. Back-ends ran interleaved, " +
        "so ratios are less affected.",
      "",
    );
  }
  if (r.failures.length) {
    out.push("## Failed steps", "", ...r.failures.map((f) => `- ${f}`), "");
  }

  const b = r.backendOnly;
  out.push("## 1. Back-end only (load generator, no guest)", "");
  if (b) {
    const c = b.config;
    out.push(
      `${c.blockSize / 1024} KiB random reads from \`vhostd load\` (vhostd's own front-end and ` +
        `driver, one thread per queue), ${c.seconds} s per run, ${c.runs} run(s), ` +
        `every back-end offering ${c.deviceQueues} queues. CPU per I/O is the back-end ` +
        "process's utime+stime (all threads, /proc/PID/stat) during the run divided by the " +
        "requests completed. Storage: `tmpfs` = image in /dev/shm (page cache, buffered I/O; " +
        (c.levers.vhostdIoEngine === undefined || c.levers.vhostdIoEngine === "auto"
          ? "vhostd's default engine there is the synchronous one, faster than io_uring on tmpfs); "
          : `vhostd \`--io-engine ${c.levers.vhostdIoEngine}\`); `) +
        `\`disk\` = image on ext4 with O_DIRECT (vhostd \`--direct\`; qsd \`cache.direct=on,` +
        `aio=${c.levers.qsdDiskAio}\`); \`null\` = no I/O (vhostd's null target vs qsd ` +
        "`null-co`), the cost of the protocol and the rings alone.",
      "",
      img("backend-iops.svg", "back-end IOPS chart"),
      "",
      img("backend-cpu.svg", "back-end CPU per I/O chart"),
      "",
    );
    const rows: string[][] = [];
    for (const storage of c.storages) {
      for (const shape of c.shapes) {
        const v = b.cases.find((x) =>
          x.storage === storage && x.shape === shape.label && x.backend === "vhostd"
        );
        const q = b.cases.find((x) =>
          x.storage === storage && x.shape === shape.label && x.backend === "qsd"
        );
        const rt = b.ratios.find((x) => x.storage === storage && x.shape === shape.label);
        rows.push([
          storage,
          shape.label,
          v ? fmt(v.iops) : "–",
          q ? fmt(q.iops) : "–",
          rt ? ratio(rt.iopsRatio, true) : "–",
          v ? fmt(v.cpuUsPerIo) : "–",
          q ? fmt(q.cpuUsPerIo) : "–",
          rt ? ratio(rt.cpuPerIoRatio, false) : "–",
          v && q ? `${fmt(v.p99Us)} / ${fmt(q.p99Us)}` : "–",
        ]);
      }
    }
    out.push(
      table([
        "storage",
        "load",
        "vhostd IOPS",
        "qsd IOPS",
        "vhostd / qsd (target ≥ 1)",
        "vhostd CPU µs/IO",
        "qsd CPU µs/IO",
        "vhostd / qsd CPU (target ≤ 1)",
        "p99 µs vhostd / qsd",
      ], rows),
      "",
      "The generator shares the machine's CPUs with the back-end; its own CPU per request is in " +
        "the JSON (`generatorCpuUsPerIo`).",
      "",
    );
    if (b.noPoll?.length) {
      const pollText = c.levers.vhostdPollUs === undefined
        ? "its default window"
        : `\`--poll-us ${c.levers.vhostdPollUs}\``;
      out.push(
        "**The busy-poll lever.** vhostd above runs with " + pollText + ": after its last " +
          "event its worker keeps polling the rings (with the driver's kicks switched off) and " +
          "its fds before it sleeps, for a window that adapts to how often events come. Here it " +
          "is again in the same run with `--poll-us 0` (sleep in epoll_wait at once):",
        "",
      );
      const pollRows = b.noPoll.map((off) => {
        const on = b.cases.find((x) =>
          x.storage === off.storage && x.shape === off.shape && x.backend === "vhostd"
        );
        return [
          off.storage,
          off.shape,
          on ? fmt(on.iops) : "–",
          fmt(off.iops),
          on ? `${sig(on.iops / off.iops, 3)}×` : "–",
          on ? fmt(on.cpuUsPerIo) : "–",
          fmt(off.cpuUsPerIo),
        ];
      });
      out.push(
        table([
          "storage",
          "load",
          "IOPS, polling",
          "IOPS, --poll-us 0",
          "polling / not",
          "CPU µs/IO, polling",
          "CPU µs/IO, --poll-us 0",
        ], pollRows),
        "",
      );
    }
  } else {
    out.push(notRun(r, "backend"), "");
  }

  const g = r.guestFio;
  out.push("## 2. Guest fio", "");
  if (g) {
    const c = g.config;
    if (g.hangs?.length) {
      out.push(
        `**${g.hangs.length} boot(s) hung and were made again** (the figures are from the ` +
          "boots that finished); what each hung boot's console showed last:",
        "",
        // Quoted as it was: console text is not Markdown (a `|` would start a table).
        "```",
        ...g.hangs.map((h) => h.trim()),
        "```",
        "",
      );
    }
    out.push(
      `fio in one ${accel} guest (${c.smp} vCPU, ${c.memoryMiB} MiB, Debian 6.1 kernel, libaio, ` +
        `direct, ${c.seconds} s per run) with a disk per back-end, all three served from the ` +
        "same image on disk: in-QEMU `virtio-blk-pci` (aio=native, cache.direct=on), " +
        `qemu-storage-daemon (aio=${c.levers.qsdDiskAio}, cache.direct=on) and vhostd ` +
        `(--direct), the vhost-user devices with ${c.deviceQueues} queue(s)` +
        (c.variants.includes("vhostd-nopoll")
          ? "; `vhostd-nopoll` is vhostd with `--poll-us 0` (the busy-poll lever)"
          : "") +
        ". The disks take " +
        `turns: each job runs on every disk, ${c.rounds} round(s) per boot, ${c.runs} ` +
        "boot(s), the order rotated from round to round and from job to job; figures are " +
        "medians over every run. Measuring the back-ends in one guest keeps " +
        "the boot-to-boot spread (several per cent under TCG) out of the ratios. The image is " +
        "opened by all three at once, so QEMU and qsd skip their image locks (`locking=off`); " +
        "only one disk does I/O at a time. " +
        "**Back-end CPU** is the back-end process for qsd and vhostd, and for in-QEMU " +
        "virtio-blk the QEMU process's non-vCPU threads (main loop and AIO threads, which do " +
        "its I/O). QEMU total CPU (vCPU threads included) is in the second table. Each job's " +
        "CPU window includes up to about a second of idle time around it. " +
        `**CPU placement:** ${describePlacement(c.placement ?? null)} (\`--no-pin\` leaves it ` +
        "to Linux; on 2 CPUs a back-end worker then sometimes shares the vCPU's CPU, which " +
        "swings vhostd's randread by tens of per cent from boot to boot).",
      "",
      img("guest-iops.svg", "guest fio IOPS chart"),
      "",
      img("guest-cpu.svg", "guest back-end CPU per I/O chart"),
      "",
    );
    const anchor = c.variants[0];
    const others = c.variants.slice(1);
    const rows = c.jobs.map((j) => [
      j.name,
      ...c.variants.map((v) => {
        const x = g.cases.find((y) => y.job === j.name && y.variant === v);
        return x ? fmt(x.iops) + spread(x.samples.map((r) => r.iops)) : "–";
      }),
      ...others.map((v) => {
        const rt = g.ratios.find((x) => x.job === j.name && x.variant === v);
        if (!rt) return "–";
        return v === "vhostd" ? ratio(rt.iopsRatio, true) : `${fmt(rt.iopsRatio)}×`;
      }),
    ]);
    out.push(
      table([
        "job",
        ...c.variants.map((v) => `${v} IOPS (range)`),
        ...others.map((v) => `${v} / ${anchor}${v === "vhostd" ? " (target ≥ 1)" : ""}`),
      ], rows),
      "",
    );
    const cpuRows = c.jobs.map((j) => [
      j.name,
      ...c.variants.map((v) => {
        const x = g.cases.find((y) => y.job === j.name && y.variant === v);
        return x ? `${fmt(x.cpuUsPerIo)} (${fmt(x.qemuTotalCpuUsPerIo)})` : "–";
      }),
    ]);
    out.push(
      "Back-end CPU µs per I/O (QEMU total CPU µs per I/O in parentheses):",
      "",
      table(["job", ...c.variants], cpuRows),
      "",
      "fio in the guest: " + c.jobs.map((j) => `\`${g.fioCommands[j.name]}\``).join("; "),
      "",
    );
  } else {
    out.push(notRun(r, "guest"), "");
  }
  const idle = r.guestIdle;
  if (idle) {
    const c = idle.config;
    out.push(
      "### Idle guest",
      "",
      `The same kind of guest with a vhost-user disk per back-end reads 1 MiB from each, then ` +
        `sleeps ${c.seconds} s; each back-end process's CPU time (user + system) over the sleep, ` +
        `median of ${c.runs} boot(s), read from /proc to its 0.01 s resolution. A back-end that polls ` +
        "or wakes on timers while nothing happens shows it here.",
      "",
      table(
        ["back-end", `CPU seconds over ${c.seconds} s`, "share of one CPU"],
        idle.cases.map((x) => [
          x.variant,
          fmt(x.cpuSeconds) + spread(x.samples),
          `${fmt(x.cpuPercent)} %`,
        ]),
      ),
      "",
    );
  } else if (r.only.includes("guest")) {
    out.push("### Idle guest", "", notRun(r, "guest"), "");
  }

  out.push("## 3. Net", "");
  const n = r.net;
  if (n) {
    const c = n.config;
    out.push("### testpmd through the back-end (no guest)", "");
    const t = n.testpmd;
    if (t) {
      const [anchor, ...others] = c.backends;
      out.push(
        "DPDK testpmd with a `net_virtio_user` port in `txonly` mode sends " +
          `${c.frameSizes.join(" B and ")} B frames into one port of the back-end; a second ` +
          "testpmd, `rxonly`, receives them from the other port. Back-ends: `vhostd switch` " +
          "with two ports, and DPDK's own vhost-user back-end, a third testpmd with two " +
          "`net_vhost` ports in `io` forward mode. The figure is the rxonly testpmd's own " +
          `\`RX-packets\` counter over a ${c.windowSeconds} s window after ${c.warmupSeconds} s ` +
          `of warm-up (Mpps; ${c.runs} run(s)${c.runs > 1 ? ", median" : ""}); the txonly ` +
          "counter is shown for context (what it offered; the rest was dropped for lack of " +
          "room).",
        "",
        `**CPU arrangement.** ${t.arrangement}`,
        "",
        img("net-testpmd.svg", "testpmd Mpps chart"),
        "",
      );
      const rows = c.frameSizes.map((f) => {
        const pick = (be: string) => t.cases.find((x) => x.frameBytes === f && x.backend === be);
        return [
          `${f} B`,
          ...c.backends.map((be) => {
            const x = pick(be);
            return x ? `${fmt(x.rxMpps)} (${fmt(x.txMpps)})` : "–";
          }),
          ...others.map((be) => {
            const rt = t.ratios.find((x) => x.frameBytes === f && x.backend === be);
            return rt ? ratio(rt.mppsRatio, true, t.target) : "–";
          }),
        ];
      });
      out.push(
        table([
          "frame",
          ...c.backends.map((be) => `${be} Mpps received (sent)`),
          ...others.map((be) => `${be} / ${anchor} (target ≥ ${t.target})`),
        ], rows),
        "",
      );
    } else {
      out.push("Not measured: the step failed (see failed steps).", "");
    }
    out.push("### Guest iperf3 over a TAP", "");
    const i = n.iperf;
    if (i) {
      const [anchor, ...others] = c.variants;
      const iaccel = i.accelerator.toUpperCase();
      const lever = c.variants.includes("vhostd-poll")
        ? ` \`vhostd-poll\` is the same with \`--poll-us ${c.leverPollUs}\` (the busy-poll lever: ` +
          "the transmit queue is polled with the guest's kicks off)."
        : "";
      out.push(
        `iperf3 TCP in one ${iaccel} guest (${c.smp} vCPU, ${c.memoryMiB} MiB, Debian 6.1 ` +
          `kernel) with one virtio-net-pci NIC per variant, each on its own TAP in its own ` +
          "network namespace (own subnet, own iperf3 server): `in-qemu` is QEMU's own device on " +
          "`-netdev tap` (userspace; there is no vhost-net here), `vhostd` is a vhost-user device " +
          `on \`vhostd net --tap\` at its defaults.${lever} The guest runs iperf3 over each NIC ` +
          `in turn, ${c.iperfSeconds} s per run, ${c.iperfRounds} round(s) per boot, ${c.runs} ` +
          "boot(s), the NICs' order rotated every round, after an unmeasured 2 s warm-up stream " +
          "each way (a TCG guest's first stream is slow); figures are medians of all runs. " +
          "Interleaving the NICs of one guest keeps the boot-to-boot spread out of the ratios. " +
          "Same device options on every NIC" +
          (i.accelerator === "tcg"
            ? " (`vectors=0`: QEMU 7.2 under TCG crashes starting a vhost-user net device with " +
              "MSI-X). **TCG-bound**: the guest's emulated CPU, not the back-end, limits these " +
              "figures."
            : ".") +
          ` **CPU placement:** ${describePlacement(c.placement ?? null)}.` +
          ` Guest commands: \`${i.iperfCommands["guest-to-ns"]}\`, then ` +
          `\`${i.iperfCommands["ns-to-guest"]}\` (N: the NIC's subnet); receiver throughput.`,
        "",
        img("net-iperf.svg", "guest iperf3 chart"),
        "",
      );
      const rows = (["guest-to-ns", "ns-to-guest"] as const).map((d) => [
        d === "guest-to-ns" ? "guest → namespace" : "namespace → guest",
        ...c.variants.map((v) => {
          const k = i.cases.find((x) => x.direction === d && x.variant === v);
          return k ? fmt(k.gbps) + spread(k.samples) : "–";
        }),
        ...others.map((v) => {
          const rt = i.ratios.find((x) => x.direction === d && x.variant === v);
          if (!rt) return "–";
          return v === "vhostd" ? ratio(rt.gbpsRatio, true, i.target) : `${fmt(rt.gbpsRatio)}×`;
        }),
      ]);
      out.push(
        table([
          "direction",
          ...c.variants.map((v) => `${v} Gbit/s (range)`),
          ...others.map((v) =>
            `${v} / ${anchor}${v === "vhostd" ? ` (target ≥ ${i.target})` : ""}`
          ),
        ], rows),
        "",
      );
      const cores = others.flatMap((v) => {
        const k = i.cases.find((x) => x.variant === v && x.backendCores !== undefined);
        return k ? [`\`${v}\` ${fmt(k.backendCores!)}`] : [];
      });
      if (cores.length > 0) {
        out.push(
          `vhostd's own CPU while it carried traffic, in cores (CPU seconds per second, both ` +
            `directions): ${cores.join(", ")}. QEMU's share of the in-qemu device's work is ` +
            "inside the QEMU process, beside the vCPU, and is not separable here.",
          "",
        );
      }
    } else {
      out.push("Not measured: the step failed (see failed steps).", "");
    }
  } else {
    out.push(notRun(r, "net"), "");
  }

  out.push("## 4. Memory", "");
  out.push(...memorySection(r, img));
  const mig = r.migration;
  out.push("## 5. Live migration", "");
  if (mig) {
    const c = mig.config;
    const by = (v: string) => mig.summary.find((x) => x.variant === v);
    const vh = by("vhostd"), qsd = by("qsd");
    out.push(
      `A guest (${c.memoryMiB} MiB, TCG) keeps its disk busy (fio, 4 KiB random reads and ` +
        `writes, QD16, O_DIRECT) and migrates between two QEMUs on this host, capped at ` +
        `${Math.round(c.bandwidthBytes / 2 ** 20)} MiB/s with QEMU's ${c.downtimeLimitMs} ms ` +
        `downtime limit; total time and downtime from \`query-migrate\`, median of ${c.runs} ` +
        "migration(s) per variant, variants interleaved. vhostd and qemu-storage-daemon run a " +
        "daemon per side on the one image (vhostd with its image lock handed over, qsd with " +
        "`locking=off`); QEMU's own virtio-blk is opened by both QEMUs.",
      "",
      img("migration.svg", "migration chart"),
      "",
      table(
        ["disk served by", "total time ms", "downtime ms", "passes", "RAM sent MiB"],
        mig.summary.map((x) => {
          const mine = mig.cases.filter((k) => k.variant === x.variant);
          return [
            x.variant,
            fmt(x.totalTimeMs),
            fmt(x.downtimeMs),
            mine.map((k) => k.passes).join(", "),
            mine.map((k) => k.transferredMiB).join(", "),
          ];
        }),
      ),
      "",
    );
    if (vh && qsd) {
      out.push(
        `vhostd / qemu-storage-daemon: total time ${
          ratio(vh.totalTimeMs / qsd.totalTimeMs, false)
        }, downtime ${ratio(vh.downtimeMs / qsd.downtimeMs, false)} (target: ≤ 1.0×).`,
        "",
      );
    }
  } else {
    out.push(notRun(r, "migration"), "");
  }

  out.push(
    "## Commands",
    "",
    "Run from the repository root; paths are those of this run.",
    "",
    "```sh",
  );
  if (b) {
    const seen = new Set<string>();
    for (const c of b.cases) {
      if (!seen.has(c.backendCommand)) {
        seen.add(c.backendCommand);
        out.push(c.backendCommand);
      }
    }
    const loads = new Set(b.cases.filter((c) => c.backend === "vhostd").map((c) => c.loadCommand));
    out.push(...loads);
  }
  if (g) {
    for (const [v, cmd] of Object.entries(g.commands)) {
      out.push(`# guest fio, ${v}`);
      if (cmd.backend) out.push(cmd.backend);
      out.push(cmd.qemu);
    }
  }
  if (idle) {
    for (const [v, cmd] of Object.entries(idle.commands)) {
      out.push(`# guest idle, ${v}`, cmd.backend, cmd.qemu);
    }
  }
  if (n) {
    for (const [what, cmds] of Object.entries(n.commands)) out.push(`# net, ${what}`, ...cmds);
  }
  const m = r.memory;
  if (m) out.push("# memory", ...m.commands);
  if (r.scale) {
    out.push(
      "# scale (one daemon of each kind; the others differ in socket and image)",
      ...r.scale.commands,
    );
  }
  if (r.sharing?.available) {
    const sh = r.sharing;
    const backends = new Set(sh.cases.map((c) => c.backendCommand));
    out.push("# sharing (the two loads run at the same time)", ...backends, ...sh.loadCommands);
  }
  if (mig) {
    for (const [v, cmds] of Object.entries(mig.commands)) out.push(`# migration, ${v}`, ...cmds);
  }
  out.push("```", "");
  return out.join("\n");
}

/** `x` against an upper bound: bold and "met" when within it. */
function withinTarget(x: number | undefined, max: number): string {
  if (x === undefined || !Number.isFinite(x)) return `≤ ${max}: –`;
  return x <= max ? `≤ ${max}: **met**` : `≤ ${max}: not met`;
}

/** The memory section: targets, breakdown, increments, growth, then scale and sharing. */
function memorySection(r: BenchResult, img: (name: string, alt: string) => string): string[] {
  const out: string[] = [];
  const m = r.memory;
  if (m) {
    const byId = (id: string): MemoryCaseResult | undefined => m.cases.find((c) => c.id === id);
    const rss = (id: string) => byId(id)?.memory.rssMiB;
    const t = m.targets;
    const d0 = m.config.deviceCounts[0];
    const dn = m.config.deviceCounts[m.config.deviceCounts.length - 1];
    const perDevice = m.increments.find((i) =>
      i.from === `run-blk-${d0}` && i.to === `run-blk-${dn}`
    );
    out.push(
      "Idle processes: listening, no front-end, measured " +
        `${m.config.settleMs} ms after start-up; ${m.config.runs} sample(s) per case, median. ` +
        "**RSS** is VmRSS from /proc/PID/status, split into **RssAnon** (private memory: V8 " +
        "heaps, stacks, buffers; what the process alone costs) and **RssFile** (resident " +
        "file pages, mostly the deno binary's own code, mapped from the page cache and **shared " +
        "by every Deno process on the host**: the second daemon does not pay for them again). " +
        "**PSS** (/proc/PID/smaps_rollup) divides shared pages among the processes mapping " +
        "them. Each case is a process of its own, started fresh. " +
        (m.sharedWorkers
          ? "This build has shared workers: `vhostd run` places devices on its default pool, " +
            'and the "a worker each" cases give every device `"ownWorker": true`.'
          : "**This build has no shared workers**: every device runs on a worker of its own " +
            '(the "a worker each" cases are therefore not measured separately).'),
      "",
      img("memory.svg", "memory chart"),
      "",
      "**Against issue 21's targets:**",
      "",
      table(["what", "RSS MiB", "threads", "target MiB"], [
        [
          "`vhostd run`, one VM: 2 blk + net (TAP) + console",
          fmt(rss("vm") ?? NaN),
          fmt(byId("vm")?.memory.threads ?? NaN),
          withinTarget(rss("vm"), t.vmMiB),
        ],
        [
          "`vhostd blk`, 1 device",
          fmt(rss("blk-cli") ?? NaN),
          fmt(byId("blk-cli")?.memory.threads ?? NaN),
          withinTarget(rss("blk-cli"), t.oneBlkMiB),
        ],
        [
          `each extra blk device, default placement (${d0} → ${dn} in one process)`,
          fmt(perDevice?.memory.rssMiB ?? NaN),
          fmt(perDevice?.memory.threads ?? NaN),
          withinTarget(perDevice?.memory.rssMiB, t.perDeviceMiB),
        ],
        [
          "qemu-storage-daemon, 1 export (reference)",
          fmt(rss("qsd") ?? NaN),
          fmt(byId("qsd")?.memory.threads ?? NaN),
          "–",
        ],
      ]),
      "",
      "**Breakdown, every case** (MiB):",
      "",
      table(
        ["process", "RSS", "RssAnon", "RssFile", "RssShmem", "PSS", "threads"],
        m.cases.map((c) => [
          c.label,
          fmt(c.memory.rssMiB) + spread(c.samples.map((x) => x.rssMiB)),
          fmt(c.memory.anonMiB),
          fmt(c.memory.fileMiB),
          fmt(c.memory.shmemMiB),
          fmt(c.pssMiB),
          fmt(c.memory.threads),
        ]),
      ),
      "",
      "**Increments** (MiB, per step; differences of the medians above):",
      "",
      table(
        ["what it adds", "RSS", "RssAnon", "RssFile", "threads"],
        m.increments.map((i) => [
          i.label,
          fmt(i.memory.rssMiB),
          fmt(i.memory.anonMiB),
          fmt(i.memory.fileMiB),
          fmt(i.memory.threads),
        ]),
      ),
      "",
      `**Growth with devices** (\`vhostd run\`, blk devices of ${m.config.queues} queues each; ` +
        "RSS MiB, threads in parentheses):",
      "",
      table(
        ["blk devices", "default placement", ...(m.sharedWorkers ? ["a worker each"] : [])],
        m.config.deviceCounts.map((n) => {
          const cell = (id: string) => {
            const c = byId(id);
            return c ? `${fmt(c.memory.rssMiB)} (${fmt(c.memory.threads)})` : "–";
          };
          return [
            String(n),
            cell(`run-blk-${n}`),
            ...(m.sharedWorkers ? [cell(`run-blk-${n}-own`)] : []),
          ];
        }),
      ),
      "",
      "**Growth with queues** (`vhostd run`, one blk device):",
      "",
      table(
        ["queues", "RSS MiB", "RssAnon MiB", "threads"],
        m.config.queueCounts.map((q) => {
          const c = byId(`run-q-${q}`);
          return [
            String(q),
            c ? fmt(c.memory.rssMiB) : "–",
            c ? fmt(c.memory.anonMiB) : "–",
            c ? fmt(c.memory.threads) : "–",
          ];
        }),
      ),
      "",
      "The VM's config (the growth cases use the same form with N blk devices and no net or " +
        "console; `vhostd run` runs it inside a network namespace of its own, where it makes " +
        "its TAP):",
      "",
      "```json",
      JSON.stringify(m.vmConfig, null, 2),
      "```",
      "",
    );
  } else {
    out.push(notRun(r, "memory"), "");
  }

  out.push("### Scale: N idle daemons on one host", "");
  const sc = r.scale;
  if (sc) {
    const c = sc.config;
    out.push(
      `N daemons at once, each serving its own image on its own socket (${c.queues} queues), ` +
        "idle with no front-end: N `vhostd blk` against N qemu-storage-daemon processes with " +
        `one export each. Started ${c.parallel} at a time, each waited for until it listens; ` +
        `then ${c.settleMs} ms of settling and an idle window of ${c.idleSeconds} s, whose ` +
        "CPU time (utime+stime, all threads) is summed over the N. Total PSS is what the N " +
        "cost the host together (the deno binary's pages counted once, divided among them); " +
        "total RSS counts those shared pages N times. One pass.",
      "",
      img("scale.svg", "scale chart"),
      "",
    );
    const rows = c.counts.map((n) => {
      const v = sc.cases.find((x) => x.backend === "vhostd" && x.daemons === n);
      const q = sc.cases.find((x) => x.backend === "qsd" && x.daemons === n);
      const rt = sc.ratios.find((x) => x.daemons === n);
      return [
        String(n),
        v ? fmt(v.totalRssMiB) : "–",
        q ? fmt(q.totalRssMiB) : "–",
        rt ? `${fmt(rt.rssRatio)}×` : "–",
        v ? fmt(v.totalPssMiB) : "–",
        q ? fmt(q.totalPssMiB) : "–",
        rt ? `${fmt(rt.pssRatio)}×` : "–",
        v && q ? `${fmt(v.totalPssMiB / n)} / ${fmt(q.totalPssMiB / n)}` : "–",
        v && q ? `${fmt(v.cpuSeconds)} / ${fmt(q.cpuSeconds)}` : "–",
        v && q ? `${fmt(v.threads)} / ${fmt(q.threads)}` : "–",
      ];
    });
    out.push(
      table([
        "daemons",
        "vhostd RSS MiB",
        "qsd RSS MiB",
        "vhostd / qsd RSS",
        "vhostd PSS MiB",
        "qsd PSS MiB",
        "vhostd / qsd PSS",
        "PSS per daemon, vhostd / qsd",
        `CPU s in ${c.idleSeconds} s idle, vhostd / qsd`,
        "threads, vhostd / qsd",
      ], rows),
      "",
    );
  } else {
    out.push(notRun(r, "scale"), "");
  }

  out.push("### Sharing a worker: two busy disks", "");
  const sh = r.sharing;
  if (sh && !sh.available) {
    out.push(
      'Not measured: this build has no shared workers (`vhostd run` refuses `"ownWorker"`), ' +
        "so there is nothing to compare a worker each against.",
      "",
    );
  } else if (sh) {
    const c = sh.config;
    out.push(
      `${sh.description[0].toUpperCase()}${sh.description.slice(1)}; ` +
        `${c.runs} run(s) per case, the two placements alternating, median of the runs. ` +
        "`null` targets do no I/O (what the worker itself costs); `tmpfs` reads a page-cached " +
        "image with buffered I/O. On this machine the two generators share the CPUs with the " +
        "back-end, so a worker each cannot use more CPUs than are left over.",
      "",
      table(
        [
          "storage",
          "shared: total IOPS",
          "a worker each: total IOPS",
          "shared / a worker each",
          "CPU µs/IO shared",
          "CPU µs/IO a worker each",
        ],
        c.storages.map((st) => {
          const a = sh.cases.find((x) => x.storage === st && x.variant === "shared");
          const b = sh.cases.find((x) => x.storage === st && x.variant === "own");
          const rt = sh.ratios.find((x) => x.storage === st);
          return [
            st,
            a ? fmt(a.totalIops) + spread(a.samples.map((x) => x.totalIops)) : "–",
            b ? fmt(b.totalIops) + spread(b.samples.map((x) => x.totalIops)) : "–",
            rt ? `${fmt(rt.iopsRatio)}×` : "–",
            a ? fmt(a.cpuUsPerIo) : "–",
            b ? fmt(b.cpuUsPerIo) : "–",
          ];
        }),
      ),
      "",
    );
  } else {
    out.push(notRun(r, "sharing"), "");
  }
  return out;
}
