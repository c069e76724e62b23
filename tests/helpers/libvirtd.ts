/**
 * A real libvirtd (Debian's libvirt-daemon and libvirt-daemon-driver-qemu) for one test, with all
 * its state in a folder of the test: nothing is left on the system afterwards.
 *
 * A privileged libvirtd keeps its state in fixed places (/etc/libvirt, /run/libvirt,
 * /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt) and looks up its QEMU user
 * (libvirt-qemu, made by libvirt-daemon-system, which is not installed) before it reads
 * qemu.conf. So it runs in a mount namespace of its own where the test's folder is bind-mounted
 * over /etc/libvirt, /run, /var/lib, /var/log and /var/cache, and over /etc/passwd and
 * /etc/group copies that add that user. Its qemu.conf runs QEMU as root, without cgroups, mount
 * namespaces, a security driver or virtlogd (none of which this host has running), and QEMU's
 * log goes to `<dir>/log/libvirt/qemu/<vm>.log`, as /var/log/libvirt/qemu/<vm>.log would on a
 * real host. QEMU's view of /tmp is the host's, so vhostd's sockets there are reachable.
 *
 * @module
 */

import { exists } from "./daemon.ts";
/** How long one virsh command may take (QEMU's capabilities are probed on first use). */
const VIRSH_TIMEOUT_MS = 180_000;

/** The private libvirtd's qemu.conf (see the module documentation for why each setting). */
const QEMU_CONF = `user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
`;

/** Bind-mounts the private folders, then becomes libvirtd (run by `unshare --mount`). */
const START_SCRIPT = `set -e
d=$1
mount --bind "$d/etc" /etc/libvirt
mount --bind "$d/run" /run
mount --bind "$d/lib" /var/lib
mount --bind "$d/log" /var/log
mount --bind "$d/cache" /var/cache
mount --bind "$d/passwd" /etc/passwd
mount --bind "$d/group" /etc/group
exec /usr/sbin/libvirtd --config "$d/etc/libvirtd.conf"
`;

/** A running private libvirtd. */
export class PrivateLibvirtd {
  /** The folder holding all its state. */
  readonly dir: string;
  /** The URI virsh connects with. */
  readonly uri: string;
  readonly #child: Deno.ChildProcess;
  readonly #exited: Promise<Deno.CommandOutput>;

  private constructor(dir: string, child: Deno.ChildProcess) {
    this.dir = dir;
    this.uri = `qemu+unix:///system?socket=${dir}/sock/libvirt-sock`;
    this.#child = child;
    this.#exited = child.output();
  }

  /** Starts libvirtd with its state in `dir` (which must exist) and waits until virsh answers. */
  static async start(dir: string): Promise<PrivateLibvirtd> {
    for (const sub of ["etc", "run", "lib", "log", "cache", "sock"]) {
      Deno.mkdirSync(`${dir}/${sub}`, { recursive: true });
    }
    Deno.writeTextFileSync(
      `${dir}/etc/libvirtd.conf`,
      `unix_sock_dir = "${dir}/sock"\nunix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\n` +
        `auth_unix_ro = "none"\nlog_outputs = "3:file:${dir}/libvirtd.log"\n`,
    );
    Deno.writeTextFileSync(`${dir}/etc/qemu.conf`, QEMU_CONF);
    Deno.copyFileSync("/etc/libvirt/libvirt.conf", `${dir}/etc/libvirt.conf`);
    const passwd = Deno.readTextFileSync("/etc/passwd");
    const group = Deno.readTextFileSync("/etc/group");
    Deno.writeTextFileSync(
      `${dir}/passwd`,
      passwd + (/^libvirt-qemu:/m.test(passwd) ? "" : "libvirt-qemu:x:64055:64055::/:/bin/false\n"),
    );
    Deno.writeTextFileSync(
      `${dir}/group`,
      group + (/^libvirt-qemu:/m.test(group) ? "" : "libvirt-qemu:x:64055:\n") +
        (/^kvm:/m.test(group) ? "" : "kvm:x:64056:\n"),
    );
    const child = new Deno.Command("unshare", {
      args: ["--mount", "--propagation", "private", "bash", "-c", START_SCRIPT, "libvirtd", dir],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const daemon = new PrivateLibvirtd(dir, child);
    const deadline = Date.now() + 60_000;
    for (;;) {
      const r = await daemon.virshResult("version").catch((e) => ({ code: -1, output: `${e}` }));
      if (r.code === 0) return daemon;
      const gone = await Promise.race([
        daemon.#exited.then((o) => o),
        new Promise<null>((res) => setTimeout(() => res(null), 200)),
      ]);
      if (gone !== null || Date.now() > deadline) {
        await daemon.stop();
        throw new Error(`libvirtd did not start:\n${r.output}\n${daemon.log()}`);
      }
    }
  }

  /**
   * Runs `virsh -c <uri> ...args`; returns its exit code and output. virsh is killed after
   * {@link VIRSH_TIMEOUT_MS} (`virsh start` waits as long as QEMU does, e.g. for a socket nobody
   * serves), and that is an error.
   */
  async virshResult(...args: string[]): Promise<{ code: number; output: string }> {
    const out = await new Deno.Command("virsh", {
      args: ["-c", this.uri, ...args],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(VIRSH_TIMEOUT_MS),
    }).output();
    const dec = new TextDecoder();
    const output = dec.decode(out.stdout) + dec.decode(out.stderr);
    if (out.signal !== null) {
      throw new Error(
        `virsh ${args.join(" ")}: no answer in ${VIRSH_TIMEOUT_MS} ms\n${this.log()}`,
      );
    }
    return { code: out.code, output };
  }

  /** Runs virsh; throws with its output and libvirt's logs unless it succeeds. */
  async virsh(...args: string[]): Promise<string> {
    const r = await this.virshResult(...args);
    if (r.code !== 0) {
      throw new Error(`virsh ${args.join(" ")} failed:\n${r.output}\n${this.log()}`);
    }
    return r.output;
  }

  /** Where libvirt logs QEMU's command line and errors for `vm` (/var/log/libvirt/qemu/<vm>.log). */
  qemuLogPath(vm: string): string {
    return `${this.dir}/log/libvirt/qemu/${vm}.log`;
  }

  /** libvirtd's own log (warnings and errors) and QEMU's logs, for a failed test's report. */
  log(): string {
    const read = (p: string) => {
      try {
        return Deno.readTextFileSync(p);
      } catch {
        return "";
      }
    };
    const out = [`--- libvirtd.log ---\n${read(`${this.dir}/libvirtd.log`)}`];
    try {
      for (const e of Deno.readDirSync(`${this.dir}/log/libvirt/qemu`)) {
        out.push(`--- ${e.name} ---\n${read(`${this.dir}/log/libvirt/qemu/${e.name}`)}`);
      }
    } catch {
      // no QEMU ran
    }
    return out.join("\n");
  }

  /**
   * Stops libvirtd, and kills any QEMU it left running (libvirtd leaves domains running when it
   * stops); its mount namespace goes with its last process.
   */
  async stop(): Promise<void> {
    try {
      this.#child.kill("SIGTERM");
    } catch {
      // already gone
    }
    await this.#exited.catch(() => undefined);
    try {
      for (const e of Deno.readDirSync(`${this.dir}/run/libvirt/qemu`)) {
        if (!e.name.endsWith(".pid")) continue;
        const pid = Number(Deno.readTextFileSync(`${this.dir}/run/libvirt/qemu/${e.name}`));
        if (!(pid > 1)) continue;
        try {
          Deno.kill(pid, "SIGKILL");
        } catch {
          continue; // gone
        }
        for (let i = 0; i < 100 && exists(`/proc/${pid}`); i++) {
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    } catch {
      // no domain ever started
    }
  }
}
