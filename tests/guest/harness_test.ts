/**
 * Proves the guest harness with real components only: the Debian guest
 * kit, QEMU 7.2 and qemu-storage-daemon. Nothing here is skipped: a
 * missing QEMU or kit is a failure.
 *
 * Run: node_modules/.bin/deno test -A tests/guest/
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  accelerator,
  assertGuestSuccess,
  describeGuestRun,
  ensureKit,
  GuestTimeoutError,
  newcArchive,
  parseResults,
  qemuCommand,
  runGuest,
} from "./qemu.ts";
import { sha256 } from "../helpers/daemon.ts";

const MiB = 1024 * 1024;

/** Children of this process whose command name starts with `prefix`. */
function childProcesses(prefix: string): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const status = Deno.readTextFileSync(`/proc/${e.name}/status`);
      const ppid = /^PPid:\s*(\d+)/m.exec(status)?.[1];
      const name = /^Name:\s*(.*)$/m.exec(status)?.[1] ?? "";
      if (Number(ppid) === Deno.pid && name.startsWith(prefix)) {
        pids.push(Number(e.name));
      }
    } catch {
      // process went away
    }
  }
  return pids;
}

Deno.test("guest kit builds (or is up to date)", async () => {
  const t0 = performance.now();
  const kit = await ensureKit();
  console.log(
    `kit: ${kit.kernel} ${kit.initrd} (${
      Math.round(performance.now() - t0)
    } ms), accel=${accelerator()}`,
  );
  assert.ok(Deno.statSync(kit.kernel).size > 1 * MiB);
  assert.ok(Deno.statSync(kit.initrd).size > 1 * MiB);
});

Deno.test("newcArchive output is read by GNU cpio", async () => {
  const archive = newcArchive([
    { name: "d" },
    { name: "d/a.txt", data: new TextEncoder().encode("hello\n"), mode: 0o644 },
    { name: "odd", data: new Uint8Array([1, 2, 3]) },
  ]);
  assert.equal(archive.length % 4, 0);
  const p = new Deno.Command("cpio", {
    args: ["-itv", "--quiet"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = p.stdin.getWriter();
  await w.write(archive);
  await w.close();
  const out = await p.output();
  const listing = new TextDecoder().decode(out.stdout);
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  assert.match(listing, /^drwxr-xr-x .* d$/m);
  assert.match(listing, /^-rw-r--r-- .* 6 .* d\/a\.txt$/m);
  assert.match(listing, /^-rwxr-xr-x .* 3 .* odd$/m);
});

Deno.test("in-QEMU virtio-blk: fio verify + ext2 round trip", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-harness-" });
  try {
    const img = `${dir}/disk.img`;
    const f = await Deno.open(img, { create: true, write: true });
    await f.truncate(256 * MiB); // sparse
    f.close();

    const script = `
set -u
waitfor /dev/vda 10 || exit 10
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=32M \\
  --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --do_verify=1
echo "RESULT fio_status=$?"
mke2fs -F /dev/vda >/dev/null || exit 12
mkdir -p /mnt/d
mount -t ext2 /dev/vda /mnt/d || exit 13
for n in 1 2 3; do
  dd if=/dev/urandom of=/mnt/d/file$n bs=4k count=$((n * 100)) 2>/dev/null || exit 14
done
mkdir /mnt/d/sub && echo "small file" > /mnt/d/sub/small
(cd /mnt/d && sha256sum file1 file2 file3 sub/small) > /root/sums
umount /mnt/d || exit 15
echo 3 > /proc/sys/vm/drop_caches
blockdev --flushbufs /dev/vda
mount -t ext2 /dev/vda /mnt/d || exit 16
(cd /mnt/d && sha256sum -c /root/sums) || exit 17
echo "RESULT sums_ok=$(wc -l < /root/sums)"
umount /mnt/d || exit 18
`;
    const r = await runGuest({ script, virtioBlkImages: [{ path: img }] });
    console.log(`virtio-blk guest run: ${Math.round(r.durationMs)} ms`);
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    const why = describeGuestRun(r);
    assert.equal(res.fio_status, "0", why);
    assert.equal(res.sums_ok, "4", why);
    // fio's job summary: no error, and verification ran.
    assert.match(r.console, /^v: \(groupid=0, jobs=1\): err= 0:/m, why);
    assert.doesNotMatch(r.console, /verify: bad|crc32c: verify failed/, why);
    assert.match(r.console, /WRITE: bw=/, why);
    assert.match(r.console, /READ: bw=/, why); // the verify pass
    // Every 4k block written (32 MiB / 4 KiB) was read back and verified.
    assert.match(r.console, /issued rwts: total=8192,8192,/, why);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vhost-user-blk via qemu-storage-daemon: guest dd reaches the image", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-harness-" });
  let qsd: Deno.ChildProcess | undefined;
  let qsdOut: Promise<Deno.CommandOutput> | undefined;
  try {
    const img = `${dir}/disk.img`;
    const sock = `${dir}/vub.sock`;
    const f = await Deno.open(img, { create: true, write: true });
    await f.truncate(64 * MiB);
    f.close();

    // 1 MiB deterministic pattern, written at offset 3 MiB.
    const pattern = new Uint8Array(1 * MiB);
    let x = 0x12345678;
    for (let i = 0; i < pattern.length; i++) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      pattern[i] = x >>> 24;
    }
    const offset = 3 * MiB;
    const want = await sha256(pattern);

    qsd = new Deno.Command("qemu-storage-daemon", {
      args: [
        "--blockdev",
        `driver=file,node-name=f0,filename=${img}`,
        "--export",
        `type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=${sock},writable=on,num-queues=1`,
      ],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    qsdOut = qsd.output();
    const t0 = performance.now();
    while (true) {
      try {
        if (Deno.statSync(sock).isSocket) break;
      } catch {
        // not yet
      }
      const early = await Promise.race([
        qsdOut.then((o) => o),
        new Promise<null>((r) => setTimeout(() => r(null), 50)),
      ]);
      if (early) {
        throw new Error(
          `qemu-storage-daemon exited ${early.code}: ${new TextDecoder().decode(early.stderr)}`,
        );
      }
      if (performance.now() - t0 > 10_000) {
        throw new Error("qemu-storage-daemon did not create its socket in 10 s");
      }
    }

    const script = `
set -u
waitfor /dev/vda 10 || exit 10
echo "RESULT size=$(cat /sys/block/vda/size)"
dd if=/pattern.bin of=/dev/vda bs=4096 seek=${
      offset / 4096
    } conv=fsync oflag=direct 2>/dev/null || exit 11
echo 3 > /proc/sys/vm/drop_caches
echo "RESULT readback=$(dd if=/dev/vda bs=4096 skip=${offset / 4096} count=${
      pattern.length / 4096
    } iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
exit 0
`;
    const r = await runGuest({
      script,
      vhostUserBlk: [{ socket: sock, numQueues: 1 }],
      files: { "/pattern.bin": pattern },
    });
    console.log(`vhost-user-blk guest run: ${Math.round(r.durationMs)} ms`);
    assertGuestSuccess(r);
    const res = parseResults(r.console, "RESULT ");
    const why = describeGuestRun(r);
    assert.equal(res.size, String((64 * MiB) / 512), why);
    assert.equal(res.readback, want, why);

    // Stop the back-end (it flushes on SIGTERM), then read the image.
    qsd.kill("SIGTERM");
    await qsdOut;
    qsd = undefined;
    const disk = await Deno.open(img, { read: true });
    try {
      await disk.seek(offset, Deno.SeekMode.Start);
      const got = new Uint8Array(pattern.length);
      let n = 0;
      while (n < got.length) {
        const k = await disk.read(got.subarray(n));
        if (k === null) break;
        n += k;
      }
      assert.equal(n, got.length);
      assert.equal(await sha256(got), want, "image does not hold the pattern");
    } finally {
      disk.close();
    }
  } finally {
    if (qsd) {
      try {
        qsd.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
    await qsdOut?.catch(() => undefined);
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("exit status, extra files and parseResults come through", async () => {
  const r = await runGuest({
    script: `
. /etc/probe.env
echo "RESULT greeting=$GREETING"
echo "RESULT modules=$(wc -l < /proc/modules)"
echo "RESULT cpus=$(grep -c ^processor /proc/cpuinfo)"
exit 7
`,
    files: { "/etc/probe.env": "GREETING='hello, guest'\n" },
    smp: 2,
  });
  const why = describeGuestRun(r);
  assert.equal(r.exitStatus, 7, why);
  assert.equal(r.qemuExitCode, 0, why);
  const res = parseResults(r.console, "RESULT ");
  assert.equal(res.greeting, "hello, guest", why);
  assert.equal(res.cpus, "2", why);
  assert.ok(Number(res.modules) >= 16, why);
  assert.equal(r.console.match(/^VHOSTD-GUEST-EXIT /gm)?.length, 1, why);
});

Deno.test("timeout kills QEMU and reports the console", async () => {
  let err: unknown;
  try {
    await runGuest({
      script: "echo sleeping-forever\nsleep 100000\n",
      timeoutMs: 10_000,
    });
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof GuestTimeoutError, `expected a timeout, got ${err}`);
  console.log(err.message.split("\n")[0]);
  assert.equal(err.result.exitStatus, null);
  assert.match(err.result.console, /sleeping-forever/);
  assert.deepEqual(childProcesses("qemu-system"), []);
});

Deno.test("QEMU start-up failure is reported, not hung", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vhostd-harness-" });
  try {
    const r = await runGuest({
      script: "exit 0\n",
      vhostUserBlk: [{ socket: `${dir}/nobody-listens.sock` }],
      timeoutMs: 30_000,
    });
    assert.equal(r.exitStatus, null, describeGuestRun(r));
    assert.notEqual(r.qemuExitCode, 0);
    assert.match(r.qemuStderr, /nobody-listens\.sock/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("/init without /test.sh reports 127 and powers off", async () => {
  const kit = await ensureKit();
  const dir = await Deno.makeTempDir({ prefix: "vhostd-harness-" });
  try {
    const log = `${dir}/console.log`;
    // The bare kit initrd: no overlay, hence no /test.sh.
    const cmd = qemuCommand({ script: "" }, kit, kit.initrd, log);
    const out = await new Deno.Command(cmd[0], {
      args: cmd.slice(1),
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(120_000),
    }).output();
    const text = Deno.readTextFileSync(log);
    assert.equal(out.code, 0, text);
    assert.match(text, /^VHOSTD-GUEST-EXIT 127\r?$/m, text);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
