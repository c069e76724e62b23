/**
 * One vhost-user connection: reads whole messages (header, payload, fds) and writes messages.
 *
 * @module
 */

import { closeQuietly } from "../sys/libc.ts";
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
      const request = this.#header.getUint32(0, true);
      const flags = this.#header.getUint32(4, true);
      const size = this.#header.getUint32(8, true);
      if ((flags & 0x3) !== Flags.VERSION) {
        throw new ProtocolError(
          `${requestName(request)}: bad version in flags 0x${flags.toString(16)}`,
        );
      }
      if (size > MAX_PAYLOAD) {
        throw new ProtocolError(`${requestName(request)}: payload of ${size} bytes is too large`);
      }
      if (size > 0) this.socket.recv(HEADER_SIZE, size, fds);
      const payload = new DataView(this.socket.buffer.buffer, HEADER_SIZE, size);
      return { request, flags, payload, fds };
    } catch (e) {
      for (const fd of fds) closeQuietly(fd);
      throw e;
    }
  }

  /** Sends a reply to `request` carrying `payload` (and fds, e.g. GET_INFLIGHT_FD). */
  reply(request: number, payload: Uint8Array, fds: readonly number[] = []): void {
    this.socket.send(encodeMessage(request, Flags.VERSION | Flags.REPLY, payload), fds);
  }

  /** Sends a request (front-end side). */
  send(request: number, flags: number, payload?: Uint8Array, fds: readonly number[] = []): void {
    this.socket.send(encodeMessage(request, Flags.VERSION | flags, payload), fds);
  }

  /** Closes the connection. */
  close(): void {
    this.socket.close();
  }
}
