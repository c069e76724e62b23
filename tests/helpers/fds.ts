/**
 * Fds of every kind a hostile front-end might hand over where another kind belongs: pipes and
 * sockets where eventfds belong, eventfds where memory belongs, memfds of the wrong size. Only
 * tests need pipes and socket pairs, so they are made here rather than in `sys/`.
 *
 * @module
 */

import { check } from "../../sys/libc.ts";
import { createEventFd } from "../../sys/event.ts";
import { createMemfd } from "../../sys/mman.ts";

const lib = Deno.dlopen("libc.so.6", {
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
});

const O_CLOEXEC = 0o2000000;
const AF_UNIX = 1;
const SOCK_STREAM = 1;

/** A pipe: `[read end, write end]`, both close-on-exec. */
export function createPipe(): [number, number] {
  const fds = new Int32Array(2);
  check(lib.symbols.pipe2(fds, O_CLOEXEC), "pipe2");
  return [fds[0], fds[1]];
}

/** A connected pair of Unix stream sockets. */
export function createSocketPair(): [number, number] {
  const fds = new Int32Array(2);
  check(lib.symbols.socketpair(AF_UNIX, SOCK_STREAM | O_CLOEXEC, 0, fds), "socketpair");
  return [fds[0], fds[1]];
}

/** The kinds {@link wrongFd} makes. */
export type WrongKind = "pipe" | "socket" | "eventfd" | "memfd";

/** Every {@link WrongKind}. */
export const WRONG_KINDS: readonly WrongKind[] = ["pipe", "socket", "eventfd", "memfd"];

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
