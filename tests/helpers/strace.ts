/**
 * Watching a running daemon's system calls with strace, for tests that count or inspect them.
 *
 * @module
 */

/**
 * Runs `fn` while `strace -f -qq` follows process `pid` with `options` (e.g. `-e trace=close`),
 * and returns the lines strace wrote. strace attaches asynchronously, thread by thread: it is
 * given `settleMs` before `fn` runs, and a moment after.
 */
export async function straceDuring(
  pid: number,
  options: string[],
  fn: () => void | Promise<void>,
  settleMs = 800,
): Promise<string[]> {
  const out = await Deno.makeTempFile({ prefix: "vhostd-strace-" });
  const strace = new Deno.Command("strace", {
    args: ["-f", "-qq", ...options, "-o", out, "-p", String(pid)],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    await new Promise((r) => setTimeout(r, settleMs));
    await fn();
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    strace.kill("SIGINT");
    await strace.output();
  }
  const text = Deno.readTextFileSync(out);
  Deno.removeSync(out);
  return text.split("\n");
}
