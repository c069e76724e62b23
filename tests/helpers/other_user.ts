/**
 * Another local user for tests: a `deno eval` script run as uid and gid 65534 ("nobody") through
 * setpriv, optionally with supplementary groups, so that a test can check what a user who is not
 * the daemon's can and cannot reach.
 *
 * @module
 */

/** The uid (and gid) the other user runs as. */
export const OTHER_UID = 65534;

/** A script running as the other user; its stdout is collected. */
export class OtherUser {
  /** Everything the script printed so far. */
  stdout = "";
  /** Everything it wrote to stderr so far. */
  stderr = "";
  readonly #child: Deno.ChildProcess;
  readonly #home: string;
  readonly #pumps: Promise<void>[];

  private constructor(child: Deno.ChildProcess, home: string) {
    this.#child = child;
    this.#home = home;
    const pump = async (s: ReadableStream<Uint8Array>, key: "stdout" | "stderr") => {
      const dec = new TextDecoder();
      for await (const chunk of s) this[key] += dec.decode(chunk, { stream: true });
    };
    this.#pumps = [pump(child.stdout, "stdout"), pump(child.stderr, "stderr")];
  }

  /**
   * Starts JavaScript `code` (run by `deno eval`, all permissions) as the other user, with
   * supplementary `groups` (none by default).
   */
  static spawn(code: string, groups: number[] = []): OtherUser {
    // Deno wants a cache folder of its own; the user's home is a private temporary one.
    const home = Deno.makeTempDirSync({ prefix: "vhostd-other-" });
    Deno.chownSync(home, OTHER_UID, OTHER_UID);
    const ids = [`--reuid=${OTHER_UID}`, `--regid=${OTHER_UID}`];
    const groupArgs = groups.length ? [`--groups=${groups.join(",")}`] : ["--clear-groups"];
    const child = new Deno.Command("setpriv", {
      args: [...ids, ...groupArgs, "--", Deno.execPath(), "eval", "--quiet", code],
      cwd: home,
      env: { HOME: home, DENO_DIR: `${home}/deno`, NO_COLOR: "1", PATH: "/usr/bin:/bin" },
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    return new OtherUser(child, home);
  }

  /** Runs `code` as the other user to its end; returns its exit code and output. */
  static async run(
    code: string,
    groups: number[] = [],
  ): Promise<{ code: number; stdout: string; stderr: string }> {
    const u = OtherUser.spawn(code, groups);
    const status = await u.exit();
    return { code: status, stdout: u.stdout, stderr: u.stderr };
  }

  /** Waits until the script printed `text`; throws with its output after `ms`. */
  async waitFor(text: string, ms = 30_000): Promise<void> {
    const end = Date.now() + ms;
    while (!this.stdout.includes(text)) {
      if (Date.now() > end) {
        throw new Error(`the other user never printed ${text}:\n${this.stdout}\n${this.stderr}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Waits for the script to end; returns its exit code. */
  async exit(): Promise<number> {
    try {
      const status = await this.#child.status;
      await Promise.all(this.#pumps);
      return status.code;
    } finally {
      Deno.removeSync(this.#home, { recursive: true });
    }
  }
}

/**
 * A script for {@link OtherUser}: connects to the Unix socket at `path`, prints `connected` (or
 * `refused <error name>`), sends `send` if given, then prints everything it receives as
 * `received <JSON>` once the peer closes or `readMs` have passed.
 */
export function connectScript(path: string, send = "", readMs = 3000): string {
  return `
    let conn;
    try {
      conn = await Deno.connect({ transport: "unix", path: ${JSON.stringify(path)} });
    } catch (e) {
      console.log("refused " + e.name);
      Deno.exit(0);
    }
    console.log("connected");
    const send = ${JSON.stringify(send)};
    try {
      if (send) await conn.write(new TextEncoder().encode(send));
    } catch (e) {
      console.log("write failed " + e.name); // refused and closed already
    }
    let text = "";
    const buf = new Uint8Array(4096);
    const timer = setTimeout(() => conn.close(), ${readMs});
    try {
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        text += new TextDecoder().decode(buf.subarray(0, n));
      }
    } catch {
      // closed by the timer
    }
    clearTimeout(timer);
    console.log("received " + JSON.stringify(text));
  `;
}
