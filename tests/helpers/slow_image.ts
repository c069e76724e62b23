/**
 * A genuinely slow image file for tests: qemu-storage-daemon exports a raw file through a
 * throttle filter (a few I/O operations per second) as a FUSE mount, which vhostd then serves like
 * any other image. Reads that miss the page cache wait for the throttled daemon, as they would
 * for a congested network file system; nothing in vhostd is faked.
 *
 * Needs /dev/fuse and qemu-storage-daemon; {@link slowImageUnavailable} says what is missing.
 *
 * @module
 */

import { closeQuietly, O, openFile } from "../../sys/libc.ts";

/** A running FUSE export of a throttled image. */
export interface SlowImage {
  /** The FUSE-mounted image file to serve. */
  path: string;
  /** Unmounts it (stops qemu-storage-daemon) and removes its files. */
  stop(): Promise<void>;
}

/** Why a slow image cannot be made here (no /dev/fuse, no qemu-storage-daemon), or null. */
export function slowImageUnavailable(): string | null {
  try {
    closeQuietly(openFile("/dev/fuse", O.RDWR));
  } catch (e) {
    return `/dev/fuse cannot be opened: ${(e as Error).message}`;
  }
  try {
    new Deno.Command("qemu-storage-daemon", { args: ["--version"], stdout: "null" }).outputSync();
  } catch {
    return "qemu-storage-daemon is not installed";
  }
  return null;
}

/**
 * Exports a fresh image of `sizeBytes` (filled with `fill`) throttled to `iops` operations a
 * second; resolves once the mount serves the image's size.
 */
export async function startSlowImage(
  sizeBytes: number,
  iops: number,
  fill = 0x5a,
): Promise<SlowImage> {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-slow-" });
  const base = `${dir}/base.img`;
  const path = `${dir}/slow.img`;
  await Deno.writeFile(base, new Uint8Array(sizeBytes).fill(fill));
  await Deno.writeFile(path, new Uint8Array(0)); // the mount point
  const child = new Deno.Command("qemu-storage-daemon", {
    args: [
      "--object",
      `throttle-group,id=tg0,x-iops-total=${iops}`,
      "--blockdev",
      `driver=file,node-name=file0,filename=${base}`,
      "--blockdev",
      "driver=throttle,node-name=slow0,throttle-group=tg0,file=file0",
      "--export",
      `type=fuse,id=exp0,node-name=slow0,mountpoint=${path},writable=on`,
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const output = Promise.all([
    new Response(child.stdout).text(),
    new Response(child.stderr).text(),
  ]).then((parts) => parts.join(""));
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const stop = async () => {
    if (!exited) child.kill("SIGTERM");
    await status;
    await output;
    await Deno.remove(dir, { recursive: true });
  };
  const deadline = Date.now() + 20_000;
  while (Deno.statSync(path).size !== sizeBytes) {
    if (exited || Date.now() > deadline) {
      await stop();
      throw new Error(`qemu-storage-daemon did not export ${path}: ${await output}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { path, stop };
}
