/**
 * A client of a console port's attach socket, for tests: collects everything the port sends and
 * waits for text to appear.
 *
 * @module
 */

/** One connection to an attach socket. */
export class AttachClient {
  /** Everything received so far, decoded as UTF-8. */
  text = "";
  readonly #conn: Deno.UnixConn;
  readonly #pump: Promise<void>;
  #closed = false;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#pump = (async () => {
      const dec = new TextDecoder();
      const buf = new Uint8Array(16384);
      try {
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          this.text += dec.decode(buf.subarray(0, n), { stream: true });
        }
      } catch {
        // closed under us
      }
      this.#closed = true;
    })();
  }

  /** Connects to `path`, retrying for up to `retryMs` while the socket does not exist yet. */
  static async connect(path: string, retryMs = 5000): Promise<AttachClient> {
    const deadline = Date.now() + retryMs;
    for (;;) {
      try {
        return new AttachClient(await Deno.connect({ transport: "unix", path }));
      } catch (e) {
        if (Date.now() >= deadline) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** Whether the server closed the connection. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Sends text (UTF-8) or bytes. */
  async send(data: string | Uint8Array): Promise<void> {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
    for (let off = 0; off < bytes.length;) off += await this.#conn.write(bytes.subarray(off));
  }

  /** Waits until `pattern` matches the received text; throws with what arrived after `ms`. */
  async waitFor(pattern: string | RegExp, ms = 30_000): Promise<RegExpMatchArray | string> {
    const deadline = Date.now() + ms;
    for (;;) {
      if (typeof pattern === "string") {
        if (this.text.includes(pattern)) return pattern;
      } else {
        const m = this.text.match(pattern);
        if (m) return m;
      }
      if (Date.now() >= deadline) {
        throw new Error(
          `attach client: no ${pattern} within ${ms} ms; got ${JSON.stringify(this.text)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** Closes the connection and waits for the reader to finish. */
  async close(): Promise<void> {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
    await this.#pump;
  }
}
