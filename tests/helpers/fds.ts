/**
 * Fds of every kind a hostile front-end might hand over where another kind belongs: pipes and
 * sockets where eventfds belong, eventfds where memory belongs, memfds of the wrong size. Only
 * tests need pipes and socket pairs, so they are made here rather than in `sys/`.
 *
 * @module
 */

import { check, libc, O } from "../../sys/libc.ts";
import { createEventFd } from "../../sys/event.ts";
import { createMemfd } from "../../sys/mman.ts";
import { AF_UNIX, SOCK_CLOEXEC, SOCK_STREAM } from "../../sys/socket.ts";

/** A pipe: `[read end, write end]`, both close-on-exec. */
export function createPipe(): [number, number] {
  const fds = new Int32Array(2);
  check(libc.pipe2(fds, O.CLOEXEC), "pipe2");
  return [fds[0], fds[1]];
}

/**
 * A connected pair of close-on-exec Unix sockets of `type` (a stream unless told otherwise;
 * `SOCK_NONBLOCK` may be or'ed in).
 */
export function createSocketPair(type: number = SOCK_STREAM): [number, number] {
  const fds = new Int32Array(2);
  check(libc.socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, fds), "socketpair");
  return [fds[0], fds[1]];
}

/** The kinds {@link wrongFd} makes. */
export type WrongKind = "pipe" | "socket" | "eventfd" | "memfd";

/** Every {@link WrongKind}. */
export const WRONG_KINDS: readonly WrongKind[] = ["pipe", "socket", "eventfd", "memfd"];

/** How the daemon names each {@link WrongKind} in its messages ("the fd is a pipe"). */
export const WRONG_KIND_SHOWN: Readonly<Record<WrongKind, string>> = {
  pipe: "pipe",
  socket: "socket",
  memfd: "file",
  eventfd: "eventfd",
};

/**
 * One fd of `kind` to send (the write end of a pipe, one end of a socket pair, an eventfd, or a
 * memfd of `memfdSize` bytes), and every fd made for it, for the caller to close afterwards.
 */
export function wrongFd(kind: WrongKind, memfdSize = 4096): { fd: number; all: number[] } {
  switch (kind) {
    case "pipe": {
      const [r, w] = createPipe();
      return { fd: w, all: [r, w] };
    }
    case "socket": {
      const [a, b] = createSocketPair();
      return { fd: a, all: [a, b] };
    }
    case "eventfd": {
      const fd = createEventFd();
      return { fd, all: [fd] };
    }
    case "memfd": {
      const fd = createMemfd("vhostd-test-wrong-fd", memfdSize);
      return { fd, all: [fd] };
    }
  }
}
