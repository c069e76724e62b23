/**
 * Pseudo-terminals and terminal modes through FFI: a pty per console port, so that `screen`,
 * `minicom` or `cat` can open the port like a serial line, and raw mode for a terminal on the
 * daemon's own stdin.
 *
 * @module
 */

import { check, closeQuietly, libc, O, openFile, SysError } from "./libc.ts";

const TCSANOW = 0;
const TIOCGWINSZ = 0x5413n;
const TIOCSWINSZ = 0x5414n;
/** Offsets of `c_oflag` and `c_lflag` in glibc's struct termios (4 tcflag_t fields first). */
const OFLAG = 4;
const LFLAG = 12;
const ISIG = 0o1;
const OPOST = 0o1;
/** glibc's struct termios is 60 bytes on Linux; a little slack costs nothing. */
const TERMIOS_SIZE = 64;

/** A pseudo-terminal pair. */
export interface Pty {
  /** The master side (the daemon's end), O_NONBLOCK. */
  master: number;
  /** The slave side, in raw mode; the daemon keeps it open (see {@link openPty}). */
  slave: number;
  /** The slave's path, `/dev/pts/N`, which users open. */
  path: string;
}

/**
 * Opens a pty pair with the slave in raw mode (no echo, no line editing, no CR/LF mapping: the
 * guest's own tty does that) and mode 0600. The daemon holds the slave open itself: with no slave
 * open, the master reports a hang-up on every epoll_wait, which would spin the data plane until
 * someone opened the pty.
 */
export function openPty(): Pty {
  const master = check(
    libc.posix_openpt(O.RDWR | O.NOCTTY | O.CLOEXEC | O.NONBLOCK),
    "posix_openpt",
  );
  let slave = -1;
  try {
    check(libc.grantpt(master), "grantpt");
    check(libc.unlockpt(master), "unlockpt");
    const name = new Uint8Array(128);
    const rc = libc.ptsname_r(master, name, BigInt(name.length));
    if (rc !== 0) throw new SysError("ptsname_r", rc);
    const path = new TextDecoder().decode(name.subarray(0, name.indexOf(0)));
    slave = openFile(path, O.RDWR | O.NOCTTY);
    // grantpt leaves the slave writable by group tty (for write(1) and wall); nobody but the
    // daemon's user is meant to type into a guest's console through it.
    check(libc.fchmod(slave, 0o600), "fchmod", path);
    makeRaw(slave, false);
    return { master, slave, path };
  } catch (e) {
    closeQuietly(slave);
    closeQuietly(master);
    throw e;
  }
}

/** Whether `fd` is a terminal. */
export function isTerminal(fd: number): boolean {
  return libc.isatty(fd) === 1;
}

/**
 * Puts the terminal `fd` in raw mode (cfmakeraw) and returns its previous settings for
 * {@link restoreTerminal}. With `interactive`, Ctrl-C and Ctrl-\ still signal the process (so a
 * user can stop the daemon from the terminal it runs in) and output processing stays on (so the
 * daemon's own log lines on stderr still start at the left margin; the guest's CR LF only gains
 * a harmless extra CR).
 */
export function makeRaw(fd: number, interactive: boolean): Uint8Array<ArrayBuffer> {
  const saved = new Uint8Array(TERMIOS_SIZE);
  check(libc.tcgetattr(fd, saved), "tcgetattr");
  const raw = saved.slice();
  libc.cfmakeraw(raw);
  if (interactive) {
    const dv = new DataView(raw.buffer);
    dv.setUint32(LFLAG, dv.getUint32(LFLAG, true) | ISIG, true);
    dv.setUint32(OFLAG, dv.getUint32(OFLAG, true) | OPOST, true);
  }
  check(libc.tcsetattr(fd, TCSANOW, raw), "tcsetattr");
  return saved;
}

/** Restores settings saved by {@link makeRaw} (errors ignored: this runs on the way out). */
export function restoreTerminal(fd: number, saved: Uint8Array<ArrayBuffer>): void {
  libc.tcsetattr(fd, TCSANOW, saved);
}

const winsize = new Uint16Array(4);

/** The window size of terminal `fd` (TIOCGWINSZ), or null if unknown (0x0 or not a terminal). */
export function windowSize(fd: number): { cols: number; rows: number } | null {
  if (libc.ioctl(fd, TIOCGWINSZ, winsize) < 0) return null;
  const [rows, cols] = winsize;
  return rows > 0 && cols > 0 ? { cols, rows } : null;
}

/** Sets the window size of terminal `fd` (TIOCSWINSZ), as a terminal emulator does. */
export function setWindowSize(fd: number, cols: number, rows: number): void {
  check(libc.ioctl(fd, TIOCSWINSZ, new Uint16Array([rows, cols, 0, 0])), "ioctl(TIOCSWINSZ)");
}
