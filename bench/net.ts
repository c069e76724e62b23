/**
 * Comparison 3, net, in two halves.
 *
 * **testpmd** (no guest): DPDK testpmd with a `net_virtio_user` port in `txonly` mode sends
 * frames of a fixed size into one port of a back-end; a second testpmd in `rxonly` mode receives
 * them from the other port. The back-end is either `vhostd switch` with two ports or DPDK's own
 * vhost-user back-end: a third testpmd with two `net_vhost` ports in `io` forward mode (port 0 ↔
 * port 1, no lookup). The figure is the rxonly testpmd's own `RX-packets` counter over a fixed
 * window after a warm-up, divided by the window (Mpps); the txonly counter is kept for context.
 * testpmd prints its port counters once a second (`--stats-period 1`, line-buffered through
 * `stdbuf -oL`); each counter line is time-stamped as it arrives, and the rate is the counter's
 * difference between the first line at or after the window's start and the first at or after its
 * end, divided by the time between those two lines.
 *
 * CPU arrangement (every testpmd forwarding lcore busy-polls, so who shares a CPU with whom is the
 * whole story on a small machine): the back-end owns CPU `cpus.backend` (vhostd's whole process
 * under `taskset`; DPDK's single forwarding lcore there) and both front-ends' forwarding lcores
 * run on `cpus.tx` and `cpus.rx` (the same CPU on a 2-CPU machine, where they share it). Each
 * testpmd's main lcore (which only prints counters once a second) sits on the other CPU. Both
 * back-ends face the same front-ends on the same CPUs.
 *
 * **Guest iperf3**: one TCG (or KVM) guest has a virtio-net-pci NIC per variant, each on its own
 * TAP moved into its own network namespace (own subnet, own iperf3 server): one served by QEMU
 * itself (`-netdev tap`, QEMU's userspace virtio-net; there is no vhost-net here), one by
 * `vhostd net --tap` at its defaults, one by `vhostd net --tap --poll-us` (the lever). The guest
 * runs iperf3 over each NIC in turn, guest → namespace then namespace → guest (`-R`), rotating
 * the order every round, after an unmeasured warm-up stream each way. Comparing NICs of one guest
 * in interleaved runs takes the boot-to-boot spread out of the ratios (under TCG a boot's speed
 * varies by several per cent: more than the difference between the back-ends). Under TCG the
 * guest's emulated CPU bounds the throughput.
 *
 * Test traffic stays on loopback sockets, in the harness's namespace and guest, on 198.18.0.0/15
 * (testpmd's txonly frames default to 198.18.0.1 → 198.18.0.2).
 *
 * @module
 */

import { accelerator, describeGuestRun, type GuestResult, runGuest } from "../tests/guest/qemu.ts";
import { linkExists, placeTap } from "../tests/helpers/net.ts";
import { type CpuPlacement, pinnedArgv, VcpuPinning } from "./placement.ts";
import {
  commandLine,
  DENO,
  lastLines,
  median,
  processCpuSeconds,
  progress,
  type RunningBackend,
  runOrder,
  sig,
  sleep,
  socketExists,
  startProcess,
  StepError,
} from "./lib.ts";

/** Back-ends joining the two testpmd front-ends. */
export type PmdBackend = "dpdk" | "vhostd";

/**
 * How a guest NIC's TAP is served: by QEMU itself, by `vhostd net` at its defaults, or by
 * `vhostd net --poll-us` with the lever's window ({@link NetConfig.leverPollUs}).
 */
export type GuestNetVariant = "in-qemu" | "vhostd" | "vhostd-poll";

/** iperf3 directions. */
export type IperfDirection = "guest-to-ns" | "ns-to-guest";

/** CPUs the testpmd half pins its busy-polling threads to. */
export interface NetCpus {
  /** The back-end: vhostd's whole process, or the DPDK back-end's forwarding lcore. */
  backend: number;
  /** The txonly front-end's forwarding lcore. */
  tx: number;
  /** The rxonly front-end's forwarding lcore. */
  rx: number;
}

/** Settings of comparison 3. */
export interface NetConfig {
  /** Back-ends of the testpmd half; the first is the anchor for ratios. */
  backends: PmdBackend[];
  /** Frame lengths handed to testpmd `--txpkts` (bytes, no FCS). */
  frameSizes: number[];
  /** Repetitions (medians are reported). */
  runs: number;
  /** Seconds of the measured window. */
  windowSeconds: number;
  /** Seconds of traffic before the window starts. */
  warmupSeconds: number;
  /** CPU placement. */
  cpus: NetCpus;
  /** `-m` of every testpmd (MiB, `--no-huge`). */
  testpmdMemoryMiB: number;
  /** `--total-num-mbufs` of every testpmd. */
  mbufs: number;
  /** Virtqueue size of the front-ends (`queue_size=`, `--rxd`, `--txd`). */
  queueSize: number;
  /** Variants of the guest half; the first is the anchor for ratios. */
  variants: GuestNetVariant[];
  /** Seconds per iperf3 run. */
  iperfSeconds: number;
  /** iperf3 runs per direction and variant in each boot. */
  iperfRounds: number;
  /** `--poll-us` of the `vhostd-poll` variant. */
  leverPollUs: number;
  /** Guest vCPUs. */
  smp: number;
  /** Guest vCPU on CPUs of its own, everything else on the rest; null leaves it to Linux. */
  placement: CpuPlacement | null;
  /** Guest RAM in MiB. */
  memoryMiB: number;
  /** Directory for sockets. */
  socketDir: string;
}

/** One testpmd run. */
export interface PmdSample {
  /** Frames the rxonly front-end received per second in the window, in millions. */
  rxMpps: number;
  /** Frames the txonly front-end sent per second in the window, in millions. */
  txMpps: number;
  /** Frames received in the window. */
  rxPackets: number;
  /** Length of the window as measured between counter lines (seconds). */
  windowSeconds: number;
}

/** Every run of one (frame size, back-end), with medians. */
export interface PmdCaseResult {
  /** Frame length in bytes. */
  frameBytes: number;
  /** Back-end. */
  backend: PmdBackend;
  /** Median received Mpps. */
  rxMpps: number;
  /** Median sent Mpps. */
  txMpps: number;
  /** Every run. */
  samples: PmdSample[];
}

/** The testpmd half. */
export interface PmdResult {
  /** Every case. */
  cases: PmdCaseResult[];
  /** Received Mpps of each back-end relative to the anchor (the first back-end). */
  ratios: { frameBytes: number; backend: PmdBackend; mppsRatio: number }[];
  /** The ratio vhostd / DPDK should reach. */
  target: number;
  /** Which CPU ran what, in words. */
  arrangement: string;
}

/** Every run of one (direction, variant), with medians. */
export interface IperfCaseResult {
  /** Direction. */
  direction: IperfDirection;
  /** Variant. */
  variant: GuestNetVariant;
  /** Median receiver throughput in Gbit/s. */
  gbps: number;
  /** Every run, boot after boot (Gbit/s). */
  samples: number[];
  /**
   * vhostd variants: the back-end process's CPU while it carried traffic, in cores (CPU seconds
   * per second; both directions together, median of the boots).
   */
  backendCores?: number;
}

/** The guest half. */
export interface IperfResult {
  /** `tcg` or `kvm`. */
  accelerator: string;
  /** Every case. */
  cases: IperfCaseResult[];
  /** Gbit/s of each variant relative to the anchor (the first variant). */
  ratios: { direction: IperfDirection; variant: GuestNetVariant; gbpsRatio: number }[];
  /** The ratio vhostd / in-QEMU should reach. */
  target: number;
  /** iperf3 command per direction, as the guest runs it. */
  iperfCommands: Record<IperfDirection, string>;
}

/** Result of comparison 3 (a half is absent if it failed). */
export interface NetResult {
  /** What was measured. */
  description: string;
  /** Settings used. */
  config: NetConfig;
  /** testpmd front-ends through vhostd vs DPDK's back-end. */
  testpmd?: PmdResult;
  /** Guest iperf3 through vhostd's TAP back-end vs QEMU's `-netdev tap`. */
  iperf?: IperfResult;
  /** Exact commands per back-end or variant (from the last run). */
  commands: Record<string, string[]>;
}

/** Target of the testpmd half: vhostd ≥ 0.5 × DPDK. */
export const PMD_TARGET = 0.5;
/** Target of the guest half: vhostd ≥ 1.0 × in-QEMU. */
export const IPERF_TARGET = 1.0;

const TX_MAC = "02:00:00:18:00:01";
const RX_MAC = "02:00:00:18:00:02";

/**
 * The CPU placement for a machine of `nproc` CPUs: back-end on CPU 0, front-ends on CPU 1 (the rx
 * one on CPU 2 if there is one). With fewer than 2 CPUs the testpmd half refuses to run.
 */
export function defaultCpus(nproc = navigator.hardwareConcurrency): NetCpus {
  return { backend: 0, tx: Math.min(1, nproc - 1), rx: nproc >= 3 ? 2 : Math.min(1, nproc - 1) };
}

/** The arrangement of {@link NetCpus}, in words for the report. */
export function describeArrangement(c: NetCpus, queueSize: number): string {
  const fronts = c.tx === c.rx
    ? `both front-ends' forwarding lcores (txonly and rxonly) share CPU ${c.tx}`
    : `the txonly forwarding lcore runs on CPU ${c.tx}, the rxonly one on CPU ${c.rx}`;
  return `The back-end owns CPU ${c.backend}: vhostd's whole process is pinned there with ` +
    `\`taskset -c ${c.backend}\` (main thread, device workers and V8's threads), and DPDK's ` +
    `back-end testpmd has its one forwarding lcore there (its main lcore, which only prints ` +
    `counters, on CPU ${c.tx}). ${fronts[0].toUpperCase()}${fronts.slice(1)}, busy-polling; ` +
    `their main lcores (counter printing, once a second) are on CPU ${c.backend}. Both back-ends ` +
    "face the same front-ends with the same handicap: testpmd busy-polls, so the front-ends " +
    "never leave CPU time to spare, and anything else running on the machine takes its share " +
    "from the same CPUs. DPDK's back-end forwards port to port (`--forward-mode=io`) with no " +
    "address lookup; vhostd's switch learns and looks up MAC addresses (the rxonly port never " +
    "sends, so its frames are flooded to the one other port; the switch's flood rate limit is " +
    "turned off for that, `--flood-rate 0`)." +
    (c.tx === c.rx
      ? " Because txonly and rxonly take turns on one CPU, whichever is descheduled stalls its " +
        "side: while rxonly waits for the CPU its receive ring fills and the back-end drops, " +
        "while txonly waits nothing new arrives. The delivered rate is then bounded by how many " +
        `frames the ${queueSize}-entry rings hold per scheduler time slice, so the absolute Mpps ` +
        "here say more about the scheduler and the machine's other load than about either " +
        "back-end; on a machine with 3 or more CPUs the harness gives rxonly its own CPU."
      : "");
}

/** A net comparison entry before any half has run. */
export function netResult(cfg: NetConfig): NetResult {
  return {
    description: "DPDK testpmd net_virtio_user txonly -> back-end -> testpmd rxonly, received " +
      "Mpps from testpmd's counters over a fixed window, vhostd switch vs DPDK net_vhost " +
      "(testpmd io forward); and guest iperf3 TCP through vhostd net --tap vs QEMU -netdev tap, " +
      "both directions, receiver Gbit/s.",
    config: cfg,
    commands: {},
  };
}

/** Namespaces and DPDK runtime directories made and not yet removed (for signal exits). */
const PENDING = { namespaces: new Set<string>(), paths: new Set<string>() };

/**
 * Removes, synchronously, every network namespace and DPDK runtime directory a net run made and
 * has not removed yet. For a signal exit, after the processes were killed; a normal run cleans up
 * after itself.
 */
export function cleanupNetSync(): void {
  for (const ns of PENDING.namespaces) {
    try {
      new Deno.Command("ip", { args: ["netns", "del", ns], stdout: "null", stderr: "null" })
        .outputSync();
    } catch {
      // gone already
    }
  }
  for (const p of PENDING.paths) {
    try {
      Deno.removeSync(p, { recursive: true });
    } catch {
      // gone already
    }
  }
  PENDING.namespaces.clear();
  PENDING.paths.clear();
}

function randomTag(): string {
  return crypto.randomUUID().replaceAll("-", "").slice(0, 6);
}

/** Runs a command; throws with its output unless it succeeds. */
async function run(argv: string[]): Promise<string> {
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command(argv[0], {
      args: argv.slice(1),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
  } catch (e) {
    throw new Error(`cannot run ${argv[0]}: ${(e as Error).message}`);
  }
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${argv.join(" ")} failed (${out.code}): ${lastLines(text)}`);
  return text;
}

/** Throws a one-line hint unless every tool is on PATH. */
async function requireTools(step: string, tools: Record<string, string>): Promise<void> {
  for (const [tool, pkg] of Object.entries(tools)) {
    try {
      await run(["sh", "-c", `command -v ${tool}`]);
    } catch {
      throw new StepError(step, `${tool} not found (Debian: apt-get install ${pkg})`);
    }
  }
}

/**
 * Time-stamped values of one periodic testpmd counter (`RX-packets` of the port statistics, not
 * the final forward statistics), fed with stdout chunks as they arrive.
 */
export class CounterLog {
  /** Values with the `performance.now()` at which their line arrived. */
  readonly samples: { t: number; value: number }[] = [];
  #partial = "";
  readonly #re: RegExp;

  /** @param counter `RX-packets` or `TX-packets`. */
  constructor(counter: "RX-packets" | "TX-packets") {
    // The periodic block has "RX-packets: N  RX-missed:" and "TX-packets: N  TX-errors:".
    const next = counter === "RX-packets" ? "RX-missed" : "TX-errors";
    this.#re = new RegExp(`^\\s*${counter}:\\s+(\\d+)\\s+${next}:`);
  }

  /** Feeds output (stderr is ignored). */
  feed = (chunk: string, stream: "stdout" | "stderr"): void => {
    if (stream !== "stdout") return;
    const t = performance.now();
    const lines = (this.#partial + chunk).split("\n");
    this.#partial = lines.pop() ?? "";
    for (const line of lines) {
      const m = this.#re.exec(line);
      if (m) this.samples.push({ t, value: Number(m[1]) });
    }
  };

  /** The latest value, or -1. */
  last(): number {
    return this.samples.length ? this.samples[this.samples.length - 1].value : -1;
  }

  /** The first sample at or after `t`, if any. */
  at(t: number): { t: number; value: number } | undefined {
    return this.samples.find((s) => s.t >= t);
  }
}

/**
 * Rate of a counter between its last line at or before `from` (or the first after it) and its
 * first line at or after `to`: a window at least as long as asked for, timed by the lines.
 */
function windowRate(
  log: CounterLog,
  from: number,
  to: number,
): { perSecond: number; delta: number; seconds: number } | null {
  const a = log.samples.findLast((s) => s.t <= from) ?? log.at(from), b = log.at(to);
  if (!a || !b || b.t <= a.t) return null;
  const seconds = (b.t - a.t) / 1000;
  return { perSecond: (b.value - a.value) / seconds, delta: b.value - a.value, seconds };
}

async function until(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(50);
  }
  return true;
}

/**
 * The start of every testpmd command line here: line-buffered output, the lcore list `lcores`
 * with `main` (which only prints counters) among them, no hugepages, no PCI, its own file prefix.
 */
function testpmdEal(cfg: NetConfig, lcores: string, main: number, prefix: string): string[] {
  return [
    "stdbuf",
    "-oL",
    "dpdk-testpmd",
    "-l",
    lcores,
    "--main-lcore",
    String(main),
    "--no-huge",
    "-m",
    String(cfg.testpmdMemoryMiB),
    "--no-pci",
    `--file-prefix=${prefix}`,
  ];
}

/** argv of a testpmd front-end: one `net_virtio_user` port on `socket`. */
export function frontendArgv(
  cfg: NetConfig,
  socket: string,
  mode: "txonly" | "rxonly",
  prefix: string,
  frameBytes: number,
): string[] {
  const fwd = mode === "txonly" ? cfg.cpus.tx : cfg.cpus.rx;
  const main = cfg.cpus.backend;
  const mac = mode === "txonly" ? TX_MAC : RX_MAC;
  return [
    ...testpmdEal(cfg, `${main},${fwd}`, main, prefix),
    "--vdev",
    `net_virtio_user0,path=${socket},queues=1,queue_size=${cfg.queueSize},mac=${mac}`,
    "--",
    `--total-num-mbufs=${cfg.mbufs}`,
    `--rxd=${cfg.queueSize}`,
    `--txd=${cfg.queueSize}`,
    `--forward-mode=${mode}`,
    ...(mode === "txonly" ? [`--txpkts=${frameBytes}`, `--eth-peer=0,${RX_MAC}`] : []),
    "--stats-period",
    "1",
  ];
}

/** argv of a back-end joining sockets `a` (txonly side) and `b` (rxonly side). */
export function pmdBackendArgv(
  cfg: NetConfig,
  backend: PmdBackend,
  a: string,
  b: string,
  prefix: string,
): string[] {
  if (backend === "vhostd") {
    return [
      "taskset",
      "-c",
      String(cfg.cpus.backend),
      DENO,
      "run",
      "-A",
      "daemon/main.ts",
      "switch",
      "--socket",
      a,
      "--socket",
      b,
      // The rxonly port never sends, so every frame is unknown unicast and flooded: without
      // this the switch's storm control would cap the stream at its default rate.
      "--flood-rate",
      "0",
      "--log-level",
      "warning",
    ];
  }
  return [
    ...testpmdEal(cfg, `${cfg.cpus.backend},${cfg.cpus.tx}`, cfg.cpus.tx, prefix),
    "--vdev",
    `net_vhost0,iface=${a},queues=1`,
    "--vdev",
    `net_vhost1,iface=${b},queues=1`,
    "--",
    `--total-num-mbufs=${cfg.mbufs}`,
    "--forward-mode=io",
    "--stats-period",
    "1",
  ];
}

async function removeQuietly(path: string): Promise<void> {
  await Deno.remove(path, { recursive: true }).catch(() => undefined);
  PENDING.paths.delete(path);
}

async function pmdOnce(
  cfg: NetConfig,
  backend: PmdBackend,
  frameBytes: number,
  runIndex: number,
  commands: Record<string, string[]>,
): Promise<PmdSample> {
  const step = `net testpmd: ${backend} ${frameBytes} B run ${runIndex + 1}`;
  const tag = randomTag();
  const a = `${cfg.socketDir}/net-${tag}-a.sock`;
  const b = `${cfg.socketDir}/net-${tag}-b.sock`;
  const prefixes = { be: `vhb${tag}be`, rx: `vhb${tag}rx`, tx: `vhb${tag}tx` };
  for (const p of Object.values(prefixes)) PENDING.paths.add(`/var/run/dpdk/${p}`);
  const started: RunningBackend[] = [];
  const start = async (
    what: string,
    argv: string[],
    ready: (out: string) => boolean,
    log?: CounterLog,
  ) => {
    try {
      const p = await startProcess(argv, ready, 60_000, { NO_COLOR: "1" }, log?.feed);
      started.push(p);
      return p;
    } catch (e) {
      throw new StepError(step, `${what} did not start: ${lastLines((e as Error).message, 3)}`);
    }
  };
  try {
    const beArgv = pmdBackendArgv(cfg, backend, a, b, prefixes.be);
    const be = await start(
      `the ${backend} back-end`,
      beArgv,
      (out) =>
        (backend === "dpdk" || out.includes("vhostd: serving")) && socketExists(a) &&
        socketExists(b),
    );
    const rxLog = new CounterLog("RX-packets");
    const txLog = new CounterLog("TX-packets");
    const firstStats = (out: string) => out.includes("NIC statistics for port 0");
    const rxArgv = frontendArgv(cfg, b, "rxonly", prefixes.rx, frameBytes);
    const rx = await start("testpmd rxonly", rxArgv, firstStats, rxLog);
    const txArgv = frontendArgv(cfg, a, "txonly", prefixes.tx, frameBytes);
    const tx = await start("testpmd txonly", txArgv, firstStats, txLog);
    commands[`testpmd, ${backend}`] = [
      `# back-end (${backend})`,
      commandLine(beArgv),
      "# rxonly front-end",
      commandLine(rxArgv),
      `# txonly front-end (${frameBytes} B shown)`,
      commandLine(txArgv),
    ];
    const detail = () =>
      `tx: ${lastLines(tx.output(), 2)}; rx: ${lastLines(rx.output(), 2)}; back-end: ${
        lastLines(be.output(), 2)
      }`;
    if (!await until(() => rxLog.last() > 0, 30_000)) {
      throw new StepError(step, `no frame reached testpmd rxonly in 30 s (${detail()})`);
    }
    await sleep(cfg.warmupSeconds * 1000);
    const from = performance.now();
    const to = from + cfg.windowSeconds * 1000;
    await sleep(cfg.windowSeconds * 1000);
    const ended = await until(
      () => (rxLog.at(to) !== undefined && txLog.at(to) !== undefined),
      10_000,
    );
    const rxRate = windowRate(rxLog, from, to);
    const txRate = windowRate(txLog, from, to);
    if (!ended || !rxRate || !txRate) {
      throw new StepError(step, `testpmd stopped printing counters (${detail()})`);
    }
    const s: PmdSample = {
      rxMpps: sig(rxRate.perSecond / 1e6, 4),
      txMpps: sig(txRate.perSecond / 1e6, 4),
      rxPackets: rxRate.delta,
      windowSeconds: sig(rxRate.seconds, 4),
    };
    if (!(s.rxPackets > 0)) {
      throw new StepError(step, `rxonly received nothing in the window (${detail()})`);
    }
    progress(
      `net testpmd ${frameBytes} B ${backend} run ${runIndex + 1}: ${s.rxMpps} Mpps received, ` +
        `${s.txMpps} Mpps sent (${s.windowSeconds} s window)`,
    );
    return s;
  } finally {
    // txonly first, so the back-end and rxonly see the traffic stop, then rxonly, then back-end.
    for (const p of started.reverse()) await p.stop();
    for (const p of Object.values(prefixes)) await removeQuietly(`/var/run/dpdk/${p}`);
    await removeQuietly(a);
    await removeQuietly(b);
  }
}

/** The testpmd half; runs are interleaved across back-ends, repetition loop outermost. */
export async function netTestpmd(
  cfg: NetConfig,
  commands: Record<string, string[]>,
): Promise<PmdResult> {
  if (cfg.cpus.tx === cfg.cpus.backend || cfg.cpus.rx === cfg.cpus.backend) {
    throw new StepError("net testpmd", "needs 2 CPUs: testpmd's main and forwarding lcores");
  }
  await requireTools("net testpmd", {
    "dpdk-testpmd": "dpdk-dev librte-net-vhost23 librte-net-virtio23",
    stdbuf: "coreutils",
    taskset: "util-linux",
  });
  const cases = new Map<string, PmdCaseResult>();
  const total = cfg.runs * cfg.frameSizes.length * cfg.backends.length;
  let n = 0;
  for (let r = 0; r < cfg.runs; r++) {
    for (const frameBytes of cfg.frameSizes) {
      for (const backend of cfg.backends) {
        n++;
        progress(`[${n}/${total}] net testpmd: ${frameBytes} B frames through ${backend}`);
        const s = await pmdOnce(cfg, backend, frameBytes, r, commands);
        const key = `${frameBytes}|${backend}`;
        let c = cases.get(key);
        if (!c) {
          c = { frameBytes, backend, rxMpps: 0, txMpps: 0, samples: [] };
          cases.set(key, c);
        }
        c.samples.push(s);
      }
    }
  }
  for (const c of cases.values()) {
    c.rxMpps = sig(median(c.samples.map((s) => s.rxMpps)), 3);
    c.txMpps = sig(median(c.samples.map((s) => s.txMpps)), 3);
  }
  const anchor = cfg.backends[0];
  const ratios: PmdResult["ratios"] = [];
  for (const frameBytes of cfg.frameSizes) {
    const a = cases.get(`${frameBytes}|${anchor}`);
    for (const backend of cfg.backends.slice(1)) {
      const c = cases.get(`${frameBytes}|${backend}`);
      if (a && c) ratios.push({ frameBytes, backend, mppsRatio: sig(c.rxMpps / a.rxMpps, 3) });
    }
  }
  return {
    cases: [...cases.values()],
    ratios,
    target: PMD_TARGET,
    arrangement: describeArrangement(cfg.cpus, cfg.queueSize),
  };
}

/** The iperf3 client command of a direction to `server`, as the guest runs it. */
export function iperfCommand(direction: IperfDirection, seconds: number, server: string): string {
  return `iperf3 -f m -c ${server} -t ${seconds}${direction === "ns-to-guest" ? " -R" : ""}`;
}

/** One of the guest's NICs: the variant serving it, and its own namespace and subnet. */
export interface GuestNic {
  /** Who serves it. */
  variant: GuestNetVariant;
  /** The guest's address on it. */
  guestAddr: string;
  /** The iperf3 server's address, in the NIC's namespace. */
  serverAddr: string;
  /** Its MAC address (the guest finds the interface by it). */
  mac: string;
}

/** The NICs of a guest carrying `variants`, one subnet of 198.18.0.0/15 each. */
export function guestNics(variants: readonly GuestNetVariant[]): GuestNic[] {
  return variants.map((variant, i) => ({
    variant,
    guestAddr: `198.18.${i + 1}.2`,
    serverAddr: `198.18.${i + 1}.1`,
    mac: `52:54:00:18:${(i + 1).toString(16).padStart(2, "0")}:02`,
  }));
}

/**
 * The guest's /test.sh: bring every NIC up (found by MAC), wait for every namespace, then `rounds`
 * rounds of iperf3 in both directions over every NIC, the NICs' order rotated each round
 * (starting from rotation `first`).
 */
export function iperfGuestScript(
  nics: readonly GuestNic[],
  seconds: number,
  rounds: number,
  first: number,
): string {
  const lines = [
    "nic() { for d in /sys/class/net/*; do " +
    '[ "$(cat $d/address)" = "$1" ] && { basename $d; return 0; }; done; return 1; }',
    'up() { dev=$(nic $1) || { echo "no NIC with MAC $1"; exit 10; }; ' +
    "ip link set $dev up || exit 10; ip addr add $2/24 dev $dev || exit 11; }",
    "reach() { i=0; until ping -c 1 -W 1 $1 >/dev/null 2>&1; do i=$((i+1)); " +
    '[ $i -lt 120 ] || { echo "never reached $1"; exit 12; }; done; }',
    "run() { out=$(iperf3 -f m -c $1 -t " + seconds + " $2 2>&1); " +
    'echo "$out"; echo "BENCH-IPERF $3 $4 $(echo "$out" | awk \'/receiver/ { for (i = 1; i <= NF; ' +
    'i++) if ($i == "Mbits/sec") print $(i-1) }\')"; }',
    ...nics.map((n) => `up ${n.mac} ${n.guestAddr}`),
    ...nics.map((n) => `reach ${n.serverAddr}`),
    // The guest's first TCP stream runs on code TCG has not translated yet: a short stream each
    // way, not measured, so that the first NIC measured is not the slow one.
    `iperf3 -c ${nics[0].serverAddr} -t 2 >/dev/null 2>&1 || exit 13`,
    `iperf3 -c ${nics[0].serverAddr} -t 2 -R >/dev/null 2>&1 || exit 13`,
    "echo BENCH-RUNS-BEGIN",
  ];
  for (let r = 0; r < rounds; r++) {
    for (const d of ["guest-to-ns", "ns-to-guest"] as IperfDirection[]) {
      for (const n of runOrder(nics, first + r)) {
        lines.push(`run ${n.serverAddr} "${d === "ns-to-guest" ? "-R" : ""}" ${n.variant} ${d}`);
      }
    }
  }
  lines.push("echo BENCH-RUNS-END", "exit 0", "");
  return lines.join("\n");
}

/** QEMU arguments of NIC `index` (`id` n<index>) for a variant. */
export function guestNicArgs(
  nic: GuestNic,
  index: number,
  socket: string,
  tap: string,
): string[] {
  // QEMU 7.2 under TCG crashes starting a vhost-user net device with MSI-X; the in-QEMU device
  // gets the same legacy interrupts so that the guest sees the same device.
  const vectors = accelerator() === "tcg" ? ",vectors=0" : "";
  const id = `n${index}`;
  const backend = nic.variant === "in-qemu"
    ? ["-netdev", `tap,id=${id},ifname=${tap},script=no,downscript=no`]
    : [
      "-chardev",
      `socket,id=${id}c,path=${socket}`,
      "-netdev",
      `vhost-user,id=${id},chardev=${id}c`,
    ];
  return [...backend, "-device", `virtio-net-pci,netdev=${id},mac=${nic.mac}${vectors}`];
}

/** The `vhostd net` command serving a vhostd variant's NIC. */
function vhostdNetArgv(cfg: NetConfig, variant: GuestNetVariant, socket: string, tap: string) {
  const argv = [DENO, "run", "-A", "daemon/main.ts", "net", "--socket", socket, "--tap", tap];
  if (variant === "vhostd-poll") argv.push("--poll-us", String(cfg.leverPollUs));
  return [...argv, "--log-level", "warning"];
}

/** What one boot measured: Gbit/s per run, and each vhostd's CPU while it carried traffic. */
interface IperfBoot {
  gbps: Map<string, number[]>;
  cpu: Map<GuestNetVariant, number>;
}

/** Waits for a TAP to appear, then moves it into `ns` with the server's address. */
async function tapIntoNamespace(tap: string, ns: string, addr: string, gaveUp: () => boolean) {
  const end = Date.now() + 60_000;
  while (!(await linkExists(tap))) {
    if (gaveUp() || Date.now() > end) throw new Error(`TAP ${tap} never appeared`);
    await sleep(100);
  }
  await placeTap(tap, ns, addr);
}

/** One guest with a NIC per variant, each in its own namespace with an iperf3 server. */
async function iperfBoot(
  cfg: NetConfig,
  boot: number,
  commands: Record<string, string[]>,
): Promise<IperfBoot> {
  const step = `net guest: boot ${boot + 1}`;
  const nics = guestNics(cfg.variants);
  const housekeeping = cfg.placement?.housekeeping;
  const pinning = new VcpuPinning(cfg.placement);
  const tag = randomTag();
  const ends = nics.map((n, i) => ({
    nic: n,
    ns: `vhostd-bench-${tag}-${i}`,
    tap: `vhb${tag}${i}`,
    socket: `${cfg.socketDir}/net-${tag}-${i}.sock`,
    made: false,
    server: undefined as RunningBackend | undefined,
    backend: undefined as RunningBackend | undefined,
  }));
  try {
    for (const e of ends) {
      try {
        PENDING.namespaces.add(e.ns);
        await run(["ip", "netns", "add", e.ns]);
        e.made = true;
        await run(["ip", "-n", e.ns, "link", "set", "lo", "up"]);
      } catch (err) {
        throw new StepError(step, `network namespace: ${(err as Error).message}`);
      }
      const serverArgv = pinnedArgv(
        ["ip", "netns", "exec", e.ns, "stdbuf", "-oL", "iperf3", "-s"],
        housekeeping,
      );
      try {
        e.server = await startProcess(
          serverArgv,
          (out) => out.includes("Server listening"),
          10_000,
        );
      } catch (err) {
        throw new StepError(step, `iperf3 server: ${lastLines((err as Error).message, 2)}`);
      }
      if (e.nic.variant !== "in-qemu") {
        const argv = pinnedArgv(vhostdNetArgv(cfg, e.nic.variant, e.socket, e.tap), housekeeping);
        try {
          e.backend = await startProcess(
            argv,
            (out) => out.includes("vhostd: serving") && socketExists(e.socket),
          );
        } catch (err) {
          throw new StepError(step, `vhostd net: ${lastLines((err as Error).message, 2)}`);
        }
      }
    }
    // QEMU (or vhostd, already) creates each TAP in our namespace; move it into its NIC's one.
    let tapError = "";
    let qemuDone = false;
    const tapsReady = Promise.all(
      ends.map((e) => tapIntoNamespace(e.tap, e.ns, e.nic.serverAddr, () => qemuDone)),
    ).catch((err) => {
      tapError = (err as Error).message;
    });
    const cpuAt = () =>
      new Map(ends.flatMap((e) => e.backend ? [[e, processCpuSeconds(e.backend.pid)]] : []));
    let cpuBegin = new Map<(typeof ends)[number], number>();
    let cpuEnd = new Map<(typeof ends)[number], number>();
    let seen = "";
    let r: GuestResult;
    try {
      r = await runGuest({
        script: iperfGuestScript(nics, cfg.iperfSeconds, cfg.iperfRounds, boot * cfg.iperfRounds),
        smp: cfg.smp,
        memoryMiB: cfg.memoryMiB,
        extraArgs: [
          "-name",
          `vhostd-bench-${tag},debug-threads=on`,
          ...ends.flatMap((e, i) => guestNicArgs(e.nic, i, e.socket, e.tap)),
        ],
        commandPrefix: pinning.commandPrefix,
        onSpawn: pinning.onSpawn,
        timeoutMs: 180_000 +
          cfg.iperfRounds * 2 * nics.length * (cfg.iperfSeconds + 10) * 1000,
        onConsole: (chunk) => {
          seen = (seen + chunk).slice(-4096);
          if (cpuBegin.size === 0 && seen.includes("BENCH-RUNS-BEGIN")) cpuBegin = cpuAt();
          if (cpuEnd.size === 0 && seen.includes("BENCH-RUNS-END")) cpuEnd = cpuAt();
        },
      });
    } catch (err) {
      throw new StepError(step, lastLines((err as Error).message, 4));
    } finally {
      qemuDone = true;
      await tapsReady;
    }
    if (tapError) throw new StepError(step, `TAP: ${tapError}`);
    try {
      await pinning.finished();
    } catch (err) {
      throw new StepError(step, `pinning the vCPU: ${(err as Error).message}`);
    }
    if (r.exitStatus !== 0 || r.qemuExitCode !== 0) {
      throw new StepError(
        step,
        `guest exit ${r.exitStatus}, QEMU exit ${r.qemuExitCode}: ${
          lastLines(describeGuestRun(r), 4)
        }`,
      );
    }
    const gbps = new Map<string, number[]>();
    for (const m of r.console.matchAll(/^BENCH-IPERF (\S+) (\S+) ?([0-9.]*)\s*$/gm)) {
      const mbps = Number(m[3]);
      if (!(mbps > 0)) {
        throw new StepError(
          step,
          `no iperf3 result for ${m[1]} ${m[2]}: ${lastLines(r.console, 4)}`,
        );
      }
      const key = `${m[2]}|${m[1]}`;
      gbps.set(key, [...(gbps.get(key) ?? []), sig(mbps / 1000, 4)]);
    }
    const expected = cfg.iperfRounds * 2 * nics.length;
    const got = [...gbps.values()].reduce((a, xs) => a + xs.length, 0);
    if (got !== expected) {
      throw new StepError(step, `${got} of ${expected} iperf3 results: ${lastLines(r.console, 4)}`);
    }
    // Each vhostd idles (its poll window shrinks to nothing) while the other NICs carry traffic,
    // so its CPU over all runs, divided by the time of its own runs, is its CPU while it worked.
    const cpu = new Map<GuestNetVariant, number>();
    const ownSeconds = cfg.iperfRounds * 2 * cfg.iperfSeconds;
    for (const [e, t0] of cpuBegin) {
      const t1 = cpuEnd.get(e);
      if (t1 !== undefined) cpu.set(e.nic.variant, sig((t1 - t0) / ownSeconds, 3));
    }
    for (const e of ends) {
      commands[`guest iperf3, ${e.nic.variant}`] = [
        `ip netns add ${e.ns}; ip -n ${e.ns} link set lo up`,
        commandLine(["ip", "netns", "exec", e.ns, "stdbuf", "-oL", "iperf3", "-s"]),
        ...(e.backend ? [commandLine(e.backend.command)] : []),
        `# when ${e.tap} appears: ip link set ${e.tap} netns ${e.ns}; ` +
        `ip -n ${e.ns} addr add ${e.nic.serverAddr}/24 dev ${e.tap}; ` +
        `ip -n ${e.ns} link set ${e.tap} up`,
      ];
    }
    commands["guest iperf3, the guest (one NIC per variant)"] = [commandLine(r.command)];
    const line = cfg.variants.map((v) =>
      `${v} ${gbps.get(`guest-to-ns|${v}`)?.join("/")} / ${gbps.get(`ns-to-guest|${v}`)?.join("/")}`
    ).join("; ");
    progress(
      `net guest boot ${boot + 1}: Gbit/s guest->ns / ns->guest: ${line} ` +
        `(boot+runs ${Math.round(r.durationMs / 1000)} s)`,
    );
    return { gbps, cpu };
  } finally {
    for (const e of ends) {
      await e.server?.stop();
      await e.backend?.stop();
      if (e.made) await run(["ip", "netns", "del", e.ns]).catch(() => undefined);
      PENDING.namespaces.delete(e.ns);
      // A TAP never moved into its namespace would still be here (QEMU's and vhostd's go with
      // their process, so this normally finds nothing).
      await run(["ip", "link", "del", e.tap]).catch(() => undefined);
      await removeQuietly(e.socket);
    }
  }
}

/**
 * The guest half: `cfg.runs` boots of one guest with a NIC per variant; in each, every variant
 * carries `cfg.iperfRounds` runs per direction, interleaved with the others' (so that the
 * variants share the guest's and the machine's ups and downs).
 */
export async function netIperf(
  cfg: NetConfig,
  commands: Record<string, string[]>,
): Promise<IperfResult> {
  await requireTools("net guest", {
    ip: "iproute2",
    iperf3: "iperf3",
    stdbuf: "coreutils",
    "qemu-system-x86_64": "qemu-system-x86",
  });
  const directions: IperfDirection[] = ["guest-to-ns", "ns-to-guest"];
  const samples = new Map<string, number[]>();
  const cpus = new Map<GuestNetVariant, number[]>();
  for (let b = 0; b < cfg.runs; b++) {
    progress(
      `[${b + 1}/${cfg.runs}] net guest: booting a ${accelerator().toUpperCase()} guest with ` +
        `${cfg.variants.length} NICs (${cfg.variants.join(", ")})`,
    );
    const boot = await iperfBoot(cfg, b, commands);
    for (const [k, xs] of boot.gbps) samples.set(k, [...(samples.get(k) ?? []), ...xs]);
    for (const [v, c] of boot.cpu) cpus.set(v, [...(cpus.get(v) ?? []), c]);
  }
  const cases: IperfCaseResult[] = [];
  for (const direction of directions) {
    for (const variant of cfg.variants) {
      const xs = samples.get(`${direction}|${variant}`) ?? [];
      const cpu = cpus.get(variant);
      cases.push({
        direction,
        variant,
        gbps: sig(median(xs), 3),
        samples: xs,
        ...(cpu ? { backendCores: sig(median(cpu), 3) } : {}),
      });
    }
  }
  const anchor = cfg.variants[0];
  const ratios: IperfResult["ratios"] = [];
  for (const direction of directions) {
    const a = cases.find((c) => c.direction === direction && c.variant === anchor);
    for (const variant of cfg.variants.slice(1)) {
      const c = cases.find((x) => x.direction === direction && x.variant === variant);
      if (a && c) ratios.push({ direction, variant, gbpsRatio: sig(c.gbps / a.gbps, 3) });
    }
  }
  const server = "198.18.N.1";
  return {
    accelerator: accelerator(),
    cases,
    ratios,
    target: IPERF_TARGET,
    iperfCommands: {
      "guest-to-ns": iperfCommand("guest-to-ns", cfg.iperfSeconds, server),
      "ns-to-guest": iperfCommand("ns-to-guest", cfg.iperfSeconds, server),
    },
  };
}
