/**
 * The back-end request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): the socket the front-end hands
 * over with SET_BACKEND_REQ_FD, on which the back-end starts conversations of its own. vhostd
 * sends one message on it, VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, when a device's config space
 * changed (a disk grew), so that the front-end reads the config again and tells the guest.
 *
 * The front-end is not trusted to read the channel: every send is non-blocking, never asks for a
 * reply (QEMU answers a config change with a GET_CONFIG on the main socket, which this same
 * thread serves: waiting for an ack here would deadlock it), and a message still unread makes a
 * new one redundant, so at most one waits in the socket however often the config changes.
 *
 * @module
 */

import type { Logger } from "../log/mod.ts";
import { closeQuietly, Errno, setNonBlocking, SysError } from "../sys/libc.ts";
import { FdSocket, unreadByPeer } from "../sys/socket.ts";
import { BackendRequest, encodeMessage, Flags } from "./message.ts";

/** What {@link BackendChannel.configChanged} did. */
export type ChannelSend =
  /** The message is in the socket. */
  | "sent"
  /** An earlier one is still unread: when the front-end reads it, it reads the new config too. */
  | "coalesced"
  /** The socket is full or broken: nothing was sent. */
  | "dropped";

/** The back-end's end of a back-end request channel. */
export class BackendChannel {
  readonly #socket: FdSocket;
  readonly #log: Logger;
  #fullLogged = false;
  #broken = false;

  /** Takes over `fd`, a connected socket (the caller checked its kind), and makes it non-blocking. */
  constructor(fd: number, log: Logger) {
    setNonBlocking(fd);
    this.#socket = new FdSocket(fd, 16); // nothing is read here
    this.#log = log;
  }

  /** The socket fd. */
  get fd(): number {
    return this.#socket.fd;
  }

  /** Sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (no payload, no reply asked), never waiting. */
  configChanged(): ChannelSend {
    if (this.#broken) return "dropped";
    try {
      // Only this message is ever sent here, so anything unread is the same news.
      if (unreadByPeer(this.fd) > 0) return "coalesced";
      this.#socket.send(encodeMessage(BackendRequest.CONFIG_CHANGE_MSG, Flags.VERSION));
      this.#fullLogged = false;
      return "sent";
    } catch (e) {
      if (e instanceof SysError && e.errno === Errno.EAGAIN) {
        // Cannot happen while the check above holds, but a socket shared with another writer
        // could fill: say so once rather than per change.
        if (!this.#fullLogged) {
          this.#log.warn("back-end channel is full: the front-end does not read it");
          this.#fullLogged = true;
        }
      } else {
        this.#broken = true;
        this.#log.warn("back-end channel failed ({error}); config changes are no longer sent", {
          error: (e as Error).message,
        });
      }
      return "dropped";
    }
  }

  /** Closes the socket. */
  close(): void {
    closeQuietly(this.fd);
  }
}
