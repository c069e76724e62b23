/**
 * systemd's notification protocol (sd_notify) for `Type=notify` units: READY=1 once everything
 * listens, RELOADING=1 ... READY=1 around a reload, STATUS= lines, STOPPING=1, and WATCHDOG=1 pings when the unit sets WatchdogSec=.
 *
 * Outside systemd (no NOTIFY_SOCKET) every call does nothing.
 *
 * @module
 */

import { sendDatagram } from "../sys/socket.ts";
import { monotonicMs } from "../sys/clock.ts";

const encoder = new TextEncoder();

/** Sends notifications to the socket systemd named in NOTIFY_SOCKET. */
export class SdNotifier {
  /** The notification socket, or null when not run by systemd. */
  readonly socket: string | null;
  /** Watchdog period in microseconds (0: no watchdog). */
  readonly watchdogUsec: number;
  #timer: ReturnType<typeof setInterval> | undefined;

  /** Reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from `env`. */
  constructor(env: { get(name: string): string | undefined } = Deno.env) {
    this.socket = env.get("NOTIFY_SOCKET") || null;
    const usec = Number(env.get("WATCHDOG_USEC") ?? 0);
    const pid = env.get("WATCHDOG_PID");
    // WATCHDOG_PID names the process that must ping; another process's watchdog is not ours.
    this.watchdogUsec = Number.isFinite(usec) && usec > 0 && (!pid || Number(pid) === Deno.pid)
      ? usec
      : 0;
  }

  /** Sends one notification (`"READY=1\nSTATUS=..."`); failures are returned, never thrown. */
  send(state: string): Error | null {
    if (this.socket === null) return null;
    try {
      sendDatagram(this.socket, encoder.encode(state));
      return null;
    } catch (e) {
      return e as Error;
    }
  }

  /** READY=1 with a status line. */
  ready(status: string): Error | null {
    return this.send(`READY=1\nSTATUS=${status}\nMAINPID=${Deno.pid}`);
  }

  /**
   * RELOADING=1 with a status line, at the start of a reload; READY=1 ({@link ready}) ends it.
   * MONOTONIC_USEC (CLOCK_MONOTONIC now) is what systemd 253 and later ask for with it
   * (Type=notify-reload).
   */
  reloading(status: string): Error | null {
    const usec = BigInt(Math.floor(monotonicMs() * 1000));
    return this.send(`RELOADING=1\nMONOTONIC_USEC=${usec}\nSTATUS=${status}`);
  }

  /** A STATUS= line. */
  status(status: string): Error | null {
    return this.send(`STATUS=${status}`);
  }

  /** STOPPING=1 with a status line. */
  stopping(status: string): Error | null {
    return this.send(`STOPPING=1\nSTATUS=${status}`);
  }

  /**
   * Pings WATCHDOG=1 every half period while `healthy()` says so. A daemon whose device worker
   * died stops pinging, and systemd restarts it (with Restart=on-failure).
   */
  startWatchdog(healthy: () => boolean): void {
    if (this.watchdogUsec === 0 || this.socket === null) return;
    const ping = () => {
      if (healthy()) this.send("WATCHDOG=1");
    };
    ping();
    this.#timer = setInterval(ping, Math.max(1, Math.floor(this.watchdogUsec / 2000)));
  }

  /** Stops the watchdog pings. */
  stopWatchdog(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
