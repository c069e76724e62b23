/**
 * One vhost-user connection: reads whole messages (header, payload, fds) and writes messages.
 *
 * @module
 */

import { closeQuietly } from "../sys/libc.ts";
import { monotonicMs } from "../sys/clock.ts";
import { FdSocket } from "../sys/socket.ts";
import {
  encodeMessage,
  Flags,
  HEADER_SIZE,
  MAX_PAYLOAD,
  type Message,
  requestName,
} from "./message.ts";

/** The peer broke the protocol; the connection must be dropped. */
export class ProtocolError extends Error {
  /** Builds the error; `message` is what gets logged. */
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** A vhost-user connection over a connected Unix socket. */
export class Connection {
  /** The underlying socket. */
  readonly socket: FdSocket;
  readonly #header: DataView;
  /** Bytes of the message being assembled by {@link poll}. */
  #have = 0;
  /** Fds that came with them. */
  #fds: number[] = [];
  /** When its first byte came ({@link monotonicMs}), 0 when no message is part-way in. */
  #startedAt = 0;

  /** Wraps a connected socket fd. */
  constructor(fd: number) {
    this.socket = new FdSocket(fd, HEADER_SIZE + MAX_PAYLOAD);
    this.#header = new DataView(this.socket.buffer.buffer);
  }

  /** The socket fd. */
  get fd(): number {
    return this.socket.fd;
  }

  /**
   * Receives one message. Throws ProtocolError for a malformed header (after closing any fds that
   * came with it), PeerClosedError on EOF, SysError on socket errors.
   */
  receive(): Message {
    const fds: number[] = [];
    try {
      this.socket.recv(0, HEADER_SIZE, fds);
      const size = this.#checkHeader();
      if (size > 0) this.socket.recv(HEADER_SIZE, size, fds);
      return this.#message(size, fds);
    } catch (e) {
      for (const fd of fds) closeQuietly(fd);
      throw e;
    }
  }

  /**
   * Takes what the peer has sent so far without waiting (the socket must be non-blocking) and
   * returns the next whole message, or null while it is still part-way in. A peer that trickles
   * a message byte by byte therefore holds nothing but its own connection; see
   * {@link partialSince} for dropping it. Throws as {@link receive} does.
   */
  poll(): Message | null {
    try {
      for (;;) {
        const need = this.#have < HEADER_SIZE ? HEADER_SIZE : HEADER_SIZE + this.#payloadSize();
        if (this.#have === need) {
          const m = this.#message(need - HEADER_SIZE, this.#fds);
          this.#fds = [];
          this.#have = 0;
          this.#startedAt = 0;
          return m;
        }
        const n = this.socket.recvAvailable(this.#have, need - this.#have, this.#fds);
        if (n === 0) {
          if (this.#have > 0 && this.#startedAt === 0) this.#startedAt = monotonicMs();
          return null;
        }
        this.#have += n;
        if (this.#have === HEADER_SIZE) this.#checkHeader();
      }
    } catch (e) {
      for (const fd of this.#fds) closeQuietly(fd);
      this.#fds = [];
      throw e;
    }
  }

  /** When the message {@link poll} is assembling began to arrive (monotonic ms), or 0. */
  get partialSince(): number {
    return this.#startedAt;
  }

  #payloadSize(): number {
    return this.#header.getUint32(8, true);
  }

  /** Validates the received header; returns the payload size. */
  #checkHeader(): number {
    const request = this.#header.getUint32(0, true);
    const flags = this.#header.getUint32(4, true);
    const size = this.#payloadSize();
    if ((flags & 0x3) !== Flags.VERSION) {
      throw new ProtocolError(
        `${requestName(request)}: bad version in flags 0x${flags.toString(16)}`,
      );
    }
    if (size > MAX_PAYLOAD) {
      throw new ProtocolError(`${requestName(request)}: payload of ${size} bytes is too large`);
    }
    return size;
  }

  #message(size: number, fds: number[]): Message {
    return {
      request: this.#header.getUint32(0, true),
      flags: this.#header.getUint32(4, true),
      payload: new DataView(this.socket.buffer.buffer, HEADER_SIZE, size),
      fds,
    };
  }

  /** Sends a reply to `request` carrying `payload` (and fds, e.g. GET_INFLIGHT_FD). */
  reply(request: number, payload: Uint8Array, fds: readonly number[] = []): void {
    this.socket.send(encodeMessage(request, Flags.VERSION | Flags.REPLY, payload), fds);
  }

  /** Sends a request (front-end side). */
  send(request: number, flags: number, payload?: Uint8Array, fds: readonly number[] = []): void {
    this.socket.send(encodeMessage(request, Flags.VERSION | flags, payload), fds);
  }

  /** Closes the connection (and any fds of a message part-way in). */
  close(): void {
    for (const fd of this.#fds) closeQuietly(fd);
    this.#fds = [];
    this.socket.close();
  }
}
