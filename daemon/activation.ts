/**
 * Socket activation (sd_listen_fds): systemd, or `systemd-socket-activate`, binds the device
 * sockets itself and passes them as fds 3, 4, ... with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES.
 * The sockets then outlive the daemon: QEMU may connect before vhostd starts or while it
 * restarts, and its connection waits in the socket's backlog.
 *
 * A device takes the passed socket bound to its path (or, for one bound elsewhere, the one whose
 * FileDescriptorName= is the device's id) instead of binding its own. Passed sockets belong to
 * systemd: their files are never removed, and each stays open here for the daemon's whole life so
 * that a device restarted by a reload can take it again.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";
import { duplicateFd, listeningUnixSocketPath, setCloseOnExec } from "../sys/socket.ts";

/** The first fd systemd passes (SD_LISTEN_FDS_START). */
const FIRST_FD = 3;
/** More passed sockets than any VM has devices is a mistake, not a reason to probe 10000 fds. */
const MAX_PASSED = 1024;

/** One socket systemd passed. */
export interface PassedSocket {
  /** Its fd (kept open; devices get copies). */
  fd: number;
  /** Its FileDescriptorName= (LISTEN_FDNAMES), or "" when none was given. */
  name: string;
  /** The path it is bound to (null: unnamed or abstract). */
  path: string | null;
  /** Whether a running device serves it now. */
  inUse: boolean;
}

let passed: PassedSocket[] = [];

/**
 * Takes the sockets named by LISTEN_FDS if LISTEN_PID is this process, and removes LISTEN_FDS,
 * LISTEN_PID and LISTEN_FDNAMES from the environment either way (nothing started from here may
 * believe they are its own). Returns the sockets; an fd that is not a listening Unix stream socket
 * is a {@link UsageError}. Called once, before any device starts.
 */
export function adoptPassedSockets(
  env: Pick<typeof Deno.env, "get" | "delete"> = Deno.env,
): PassedSocket[] {
  const count = env.get("LISTEN_FDS");
  const pid = env.get("LISTEN_PID");
  const names = env.get("LISTEN_FDNAMES");
  for (const key of ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"]) env.delete(key);
  if (count === undefined || pid === undefined || Number(pid) !== Deno.pid) return passed;
  if (!/^\d{1,4}$/.test(count) || Number(count) > MAX_PASSED) {
    throw new UsageError(`LISTEN_FDS must be a number of sockets, not "${count.slice(0, 20)}"`);
  }
  const n = Number(count);
  const nameList = names === undefined ? [] : names.split(":");
  const found: PassedSocket[] = [];
  for (let i = 0; i < n; i++) {
    const fd = FIRST_FD + i;
    const name = nameList[i] ?? "";
    const path = checkListening(
      fd,
      `socket activation: passed fd ${fd}${name ? ` (${name})` : ""}`,
      " (ListenStream= with a path)",
    );
    found.push({ fd, name, path, inUse: false });
  }
  // A socket given with --fd as well is already adopted.
  passed = [...passed, ...found.filter((f) => !passed.some((p) => p.fd === f.fd))];
  return passed;
}

/**
 * Adopts the listening socket inherited as `fd` (`--fd N`, QEMU's back-end program conventions)
 * like a passed one, and returns the path a device serves it under: the path it is bound to, or
 * `fd:N` for an unnamed or abstract one. An fd that is not a listening Unix stream socket is a
 * {@link UsageError}.
 */
export function adoptInheritedSocket(fd: number): string {
  const path = checkListening(fd, `--fd ${fd}`);
  const label = path ?? `fd:${fd}`;
  passed.push({ fd, name: "", path: label, inUse: false });
  return label;
}

/**
 * The path an inherited `fd` is bound to (null: unnamed or abstract), once it is known to be a
 * listening Unix stream socket, which is then kept from programs this one might execute; anything
 * else is a {@link UsageError} naming the fd as `what`, with `hint` on what it should have been.
 */
function checkListening(fd: number, what: string, hint = ""): string | null {
  try {
    const path = listeningUnixSocketPath(fd);
    setCloseOnExec(fd);
    return path;
  } catch (e) {
    throw new UsageError(
      `${what} is not a listening Unix stream socket${hint}: ${(e as Error).message}`,
    );
  }
}

/** The sockets passed at start (empty without socket activation). */
export function passedSockets(): readonly PassedSocket[] {
  return passed;
}

/**
 * A copy of the passed socket for the device `name` at `path` (the one bound to `path`, else one
 * whose FileDescriptorName= is `name`), or null when none was passed. It is marked in use
 * until `release` runs; one in use is never handed out twice.
 */
export function takePassedSocket(
  path: string,
  name: string,
): { fd: number; release(): void } | null {
  const s = passed.find((p) => !p.inUse && p.path === path) ??
    passed.find((p) => !p.inUse && p.name !== "" && p.name === name);
  if (s === undefined) return null;
  const fd = duplicateFd(s.fd);
  s.inUse = true;
  return { fd, release: () => s.inUse = false };
}

/** How a passed socket is named in messages. */
export function describePassed(s: PassedSocket): string {
  const where = s.path ?? "an unnamed or abstract address";
  return `fd ${s.fd} (${where}${s.name ? `, FileDescriptorName=${s.name}` : ""})`;
}
