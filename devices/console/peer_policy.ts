/**
 * Who may connect to a console's Unix sockets, checked with SO_PEERCRED when a connection is
 * accepted: the daemon's own uid, root, and the uids the operator listed.
 *
 * The socket file's mode is the first gate; this is the second, and it still holds when the file
 * or its folder is wider open than meant (a group-writable run directory, a mode widened for
 * another reason). A console is more than a log: whoever attaches types into the guest, and
 * whoever takes QEMU's place on a character-device socket reads what is typed, passwords included.
 *
 * @module
 */

import { libc } from "../../sys/libc.ts";
import { type PeerCredentials, peerCredentials } from "../../sys/socket.ts";

/** The uids that may connect: the daemon's, root's, and those listed. */
export class PeerPolicy {
  /** The uids admitted. */
  readonly uids: ReadonlySet<number>;

  /** Admits the daemon's own uid, root, and `allowUids`. */
  constructor(allowUids: readonly number[] = []) {
    this.uids = new Set([libc.getuid(), 0, ...allowUids]);
  }

  /**
   * The peer of the connected Unix socket `fd` if it is admitted; otherwise why not, as one line
   * for the refused peer and the log.
   */
  check(fd: number): { peer: PeerCredentials } | { refused: string } {
    let peer: PeerCredentials;
    try {
      peer = peerCredentials(fd);
    } catch (e) {
      return { refused: `cannot read the peer's credentials: ${(e as Error).message}` };
    }
    if (this.uids.has(peer.uid)) return { peer };
    return { refused: `uid ${peer.uid} is not allowed to connect` };
  }
}
