/**
 * A Unix datagram socket standing in for systemd's notification socket, for tests: bind it, pass
 * its path as NOTIFY_SOCKET, and read what the daemon sends. Built on FFI because Deno's own
 * datagram sockets are behind an unstable flag.
 *
 * @module
 */

import { check, closeQuietly, cstring, Errno, errno, libc, SysError } from "../../sys/libc.ts";
import { AF_UNIX, MSG_DONTWAIT, SOCK_CLOEXEC, SOCK_DGRAM } from "../../sys/socket.ts";

/** A bound datagram socket collecting notifications. */
export class NotifySocket {
  /** NOTIFY_SOCKET value (`@name` for an abstract socket). */
  readonly address: string;
  /** Every datagram received so far, with the time it was read. */
  readonly messages: { at: number; text: string }[] = [];
  readonly #fd: number;
  readonly #buf = new Uint8Array(4096);

  /** Binds `address`: a path, or `@name` for the abstract namespace. */
  constructor(address: string) {
    this.address = address;
    const name = address.startsWith("@") ? address.slice(1) : address;
    const bytes = address.startsWith("@") ? new TextEncoder().encode(name) : cstring(name);
    const abstract = address.startsWith("@") ? 1 : 0;
    const addr = new Uint8Array(2 + abstract + bytes.length);
    new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
    addr.set(bytes, 2 + abstract);
    this.#fd = check(libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0), "socket");
    if (libc.bind(this.#fd, addr, addr.length) < 0) {
      const err = errno();
      closeQuietly(this.#fd);
      throw new SysError("bind", err, address);
    }
  }

  /** Reads every datagram waiting (never blocks). */
  drain(): void {
    for (;;) {
      const n = Number(libc.recv(this.#fd, this.#buf, BigInt(this.#buf.length), MSG_DONTWAIT));
      if (n < 0) {
        const err = errno();
        if (err === Errno.EAGAIN || err === Errno.EINTR) return;
        throw new SysError("recv", err);
      }
      this.messages.push({
        at: Date.now(),
        text: new TextDecoder().decode(this.#buf.subarray(0, n)),
      });
    }
  }

  /**
   * Polls every 10 ms until a datagram containing the line `line` arrives; returns its index.
   * `onEach` runs on every datagram as soon as it is read (checks that must happen right then).
   */
  async waitFor(line: string, timeoutMs: number, onEach?: (text: string) => void): Promise<number> {
    const end = Date.now() + timeoutMs;
    let seen = 0;
    for (;;) {
      this.drain();
      for (; seen < this.messages.length; seen++) {
        const text = this.messages[seen].text;
        onEach?.(text);
        if (text.split("\n").includes(line)) return seen;
      }
      if (Date.now() > end) {
        throw new Error(
          `no "${line}" within ${timeoutMs} ms; got ${JSON.stringify(this.messages)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Closes the socket (and removes a path socket's file). */
  close(): void {
    closeQuietly(this.#fd);
    if (!this.address.startsWith("@")) {
      try {
        Deno.removeSync(this.address);
      } catch {
        // already gone
      }
    }
  }
}
