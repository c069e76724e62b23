/**
 * The character-device mode's worker: QEMU's own virtio-console (`-device virtconsole` or
 * `virtserialport`) talks to a `-chardev socket` that connects here, one socket per port, and
 * the bytes are plain terminal data. The same {@link PortHub}s as in vhost-user mode keep the
 * logs, scrollback and attach sockets, in one epoll loop.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { getLogger, type Logger } from "../../log/mod.ts";
import { rateLimited } from "../../log/rate_limit.ts";
import { closeQuietly, Errno, errno, libc, setNonBlocking } from "../../sys/libc.ts";
import { type LogSettings, setupLogging } from "../../log/setup.ts";
import { EventLoop } from "../../vhost-user/event_loop.ts";
import { Acceptor, refuse } from "./acceptor.ts";
import { PeerPolicy } from "./peer_policy.ts";
import { type PortConfig, PortHub } from "./port_hub.ts";

/** The first message the worker receives. */
export interface ChardevWorkerInit {
  /** The ports. */
  ports: PortConfig[];
  /** Per port: the listening socket QEMU's chardev connects to. */
  chardevFds: number[];
  /** Per port: its path, removed on exit. */
  chardevPaths: string[];
  /** Uids besides the daemon's own and root whose QEMU may connect (`--allow-uid`). */
  allowUids: number[];
  /** Signalled to stop. */
  shutdownFd: number;
  /** Logging. */
  log: LogSettings;
}

/** What the worker reports. */
export type ChardevWorkerReport = { type: "ready" } | { type: "stopped" } | {
  type: "failed";
  message: string;
};

const READ_CHUNK = 16 * 1024;
/** How often input that QEMU could not take yet is retried. */
const RETRY_MS = 20;

/**
 * QEMUs one port may have at once: the VM's, and during a live migration the destination's, which
 * connects while the source still runs (one daemon serving both sides).
 */
const MAX_FRONT_ENDS = 2;

/**
 * One port's link to QEMU's chardev. Output from any connected QEMU goes to the port's log,
 * scrollback and clients; input goes to the QEMU that connected last, which during a migration
 * is the destination: typed input waits in its socket until the guest runs there (the paused
 * source would never read it). When that QEMU leaves, input goes to the other again.
 */
class ChardevLink {
  readonly hub: PortHub;
  readonly #listenFd: number;
  readonly #loop: EventLoop;
  readonly #acceptor: Acceptor;
  readonly #peers: PeerPolicy;
  /** Rate-limited: a front-end that redials in a loop causes these lines. */
  readonly #log: Logger;
  readonly #buf = new Uint8Array(READ_CHUNK);
  /** Connected QEMUs, oldest first; the last one gets the input. */
  readonly #fds: number[] = [];

  /** The connection that takes input, or -1. */
  get #fd(): number {
    return this.#fds.length > 0 ? this.#fds[this.#fds.length - 1] : -1;
  }

  constructor(hub: PortHub, listenFd: number, loop: EventLoop, peers: PeerPolicy) {
    this.hub = hub;
    this.#listenFd = listenFd;
    this.#loop = loop;
    this.#peers = peers;
    this.#log = rateLimited(getLogger(["vhostd", "console"]));
    setNonBlocking(listenFd);
    this.#acceptor = new Acceptor(
      listenFd,
      loop,
      (fd) => this.#admit(fd),
      this.#log,
      `the chardev socket of port ${hub.id}`,
    );
    this.#acceptor.start();
    hub.onInput = () => this.flush();
  }

  /** Whether input is waiting for QEMU to take it. */
  get backlog(): boolean {
    return this.#fd >= 0 && this.hub.input.length > 0;
  }

  /**
   * Takes QEMU's connection if its uid is allowed: whoever holds this socket reads everything
   * typed into the console, so a local user must not be able to take QEMU's place.
   */
  #admit(fd: number): void {
    const verdict = this.#peers.check(fd);
    if ("refused" in verdict) {
      this.#log.warn("refusing a front-end on port {port}: {why}", {
        port: this.hub.id,
        why: verdict.refused,
      });
      refuse(fd, verdict.refused);
      return;
    }
    if (this.#fds.length >= MAX_FRONT_ENDS) {
      // A VM and a migration's destination at most: more would interleave unrelated bytes.
      this.#log.warn("refusing front-end pid {pid} on port {port}: {count} already connected", {
        pid: verdict.peer.pid,
        port: this.hub.id,
        count: this.#fds.length,
      });
      closeQuietly(fd);
      return;
    }
    setNonBlocking(fd);
    this.#fds.push(fd);
    this.#loop.watch(fd, () => this.#read(fd));
    this.#log.info("QEMU connected to port {port} (pid {pid}, uid {uid}){also}", {
      port: this.hub.id,
      ...verdict.peer,
      also: this.#fds.length > 1
        ? "; input goes to it from now on (a migration's destination)"
        : "",
    });
    this.flush();
  }

  #read(fd: number): void {
    const n = Number(libc.read(fd, this.#buf, BigInt(READ_CHUNK)));
    if (n < 0) {
      const err = errno();
      if (err === Errno.EAGAIN || err === Errno.EINTR) return;
    }
    if (n <= 0) {
      this.#disconnect(fd);
      return;
    }
    this.hub.output(this.#buf.subarray(0, n));
  }

  /** Sends waiting input to QEMU, as much as its socket takes now. */
  flush(): void {
    while (this.#fd >= 0 && this.hub.input.length > 0) {
      const seg = this.hub.input.segment(0) as Uint8Array<ArrayBuffer>;
      const n = Number(libc.write(this.#fd, seg, BigInt(seg.length)));
      if (n < 0) {
        const err = errno();
        if (err === Errno.EINTR) continue;
        if (err !== Errno.EAGAIN) this.#disconnect(this.#fd);
        else this.#loop.wakeTicks(); // QEMU's socket is full: retry on the loop's tick
        return;
      }
      this.hub.consumed(n);
    }
  }

  #disconnect(fd: number): void {
    const i = this.#fds.indexOf(fd);
    if (i < 0) return;
    this.#fds.splice(i, 1);
    this.#loop.unwatch(fd);
    closeQuietly(fd);
    this.#log.info("QEMU left port {port}{left}", {
      port: this.hub.id,
      left: this.#fds.length > 0 ? "; the other connected QEMU takes the input" : "",
    });
    this.flush();
  }

  close(): void {
    for (const fd of [...this.#fds]) this.#disconnect(fd);
    this.#acceptor.close();
    closeQuietly(this.#listenFd);
  }
}

const report = (r: ChardevWorkerReport) => self.postMessage(r);

self.onmessage = (event: MessageEvent<ChardevWorkerInit>) => {
  const init = event.data;
  setupLogging(init.log);
  const loop = new EventLoop();
  const links: ChardevLink[] = [];
  const peers = new PeerPolicy(init.allowUids);
  try {
    init.ports.forEach((p, i) => {
      const hub = new PortHub(p);
      hub.start(loop);
      links.push(new ChardevLink(hub, init.chardevFds[i], loop, peers));
    });
    loop.addTick({
      intervalMs: RETRY_MS,
      run: () => {
        for (const l of links) if (l.backlog) l.flush();
        return links.some((l) => l.backlog);
      },
    });
  } catch (e) {
    report({ type: "failed", message: (e as Error).message });
    self.close();
    return;
  }
  report({ type: "ready" });
  try {
    loop.run(init.shutdownFd);
  } catch (e) {
    getLogger(["vhostd", "console"]).fatal("console loop stopped: {error}", {
      error: (e as Error).stack ?? String(e),
    });
  } finally {
    for (const l of links) {
      l.close();
      l.hub.close();
    }
    for (const path of init.chardevPaths) {
      try {
        Deno.removeSync(path);
      } catch {
        // already gone
      }
    }
    loop.close();
    report({ type: "stopped" });
    self.close();
  }
};
