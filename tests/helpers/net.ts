/**
 * Helpers for the network tests: QEMU arguments of a vhost-user net device, running `ip` and
 * friends, and moving a daemon's TAP into a test namespace.
 *
 * @module
 */

/** QEMU arguments for a virtio-net device on a vhost-user socket (vectors=0: QEMU 7.2 TCG bug). */
export function netDeviceArgs(
  id: string,
  socket: string,
  mac: string,
  options: { queues?: number; reconnect?: boolean } = {},
): string[] {
  const queues = options.queues ?? 1;
  const mq = queues > 1 ? `,queues=${queues}` : "";
  return [
    "-chardev",
    `socket,id=${id}c,path=${socket}${options.reconnect ? ",reconnect=1" : ""}`,
    "-netdev",
    `vhost-user,id=${id},chardev=${id}c${mq}`,
    "-device",
    `virtio-net-pci,netdev=${id},mac=${mac},vectors=0${queues > 1 ? ",mq=on" : ""}`,
  ];
}

/** Runs a command; throws with its output unless it succeeds. */
export async function run(cmd: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${text}`);
  return text;
}

/** Whether a network interface `name` exists in namespace `ns` (or in ours). */
export async function linkExists(name: string, ns?: string): Promise<boolean> {
  const args = ns ? ["-n", ns, "link", "show", name] : ["link", "show", name];
  const out = await new Deno.Command("ip", { args, stdout: "null", stderr: "null" }).output();
  return out.success;
}

/**
 * Puts the daemon's TAP into the test namespace `ns` and gives it `addr`/24. A TAP the daemon
 * created dies with the daemon, so after a restart there is a fresh one in our namespace to move
 * again; a TAP that survived in the test namespace (persistent) is only addressed and brought up
 * again.
 */
export async function placeTap(tap: string, ns: string, addr: string): Promise<void> {
  if (await linkExists(tap)) {
    if (await linkExists(tap, ns)) {
      throw new Error(`TAP ${tap} exists both here and in namespace ${ns}`);
    }
    await run("ip", "link", "set", tap, "netns", ns);
  } else if (!(await linkExists(tap, ns))) {
    throw new Error(`the daemon's TAP ${tap} is nowhere`);
  }
  await run("ip", "-n", ns, "addr", "replace", `${addr}/24`, "dev", tap);
  await run("ip", "-n", ns, "link", "set", tap, "up");
}

/** A ping from the peer namespace, running until stopped. */
export class Pinger {
  readonly #child: Deno.ChildProcess;
  readonly #output: Promise<string>;

  /** Pings `target` from namespace `ns` ten times a second. */
  constructor(ns: string, target: string) {
    this.#child = new Deno.Command("ip", {
      args: ["netns", "exec", ns, "ping", "-n", "-i", "0.1", "-W", "1", target],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#output = this.#child.output().then((o) =>
      new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr)
    );
  }

  /** Stops it; returns how many echo requests went out and how many came back. */
  async stop(): Promise<{ sent: number; received: number; text: string }> {
    this.#child.kill("SIGINT");
    const text = await this.#output;
    const m = text.match(/(\d+) packets transmitted, (\d+) (?:packets )?received/);
    if (!m) throw new Error(`no ping summary:\n${text}`);
    return { sent: Number(m[1]), received: Number(m[2]), text };
  }
}

/** Waits until `ns` can ping `target` once. */
export async function awaitReachable(
  ns: string,
  target: string,
  timeoutMs = 120_000,
): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const out = await new Deno.Command("ip", {
      args: ["netns", "exec", ns, "ping", "-n", "-c", "1", "-W", "1", target],
      stdout: "null",
      stderr: "null",
    }).output();
    if (out.success) return;
    if (Date.now() > end) throw new Error(`${target} not reachable from ${ns}`);
  }
}

/** Tells the guest at `addr` to stop (a TCP connection to its port 7000). */
export async function stopGuest(ns: string, addr: string): Promise<void> {
  await new Deno.Command("ip", {
    args: ["netns", "exec", ns, "bash", "-c", `exec 3<>/dev/tcp/${addr}/7000`],
    stdout: "null",
    stderr: "null",
  }).output();
}

/** Runs `fn` with a fresh network namespace, deleted afterwards. */
export async function withNamespace(
  prefix: string,
  fn: (ns: string) => Promise<void>,
): Promise<void> {
  const ns = `${prefix}${Deno.pid % 10000}`;
  await run("ip", "netns", "add", ns);
  try {
    await run("ip", "-n", ns, "link", "set", "lo", "up");
    await fn(ns);
  } finally {
    await run("ip", "netns", "del", ns).catch(() => undefined);
  }
}
