/**
 * The error every layer may throw for bad input from the user, so that `vhostd` can tell it apart
 * from a failure of its own. It lives at the bottom of the layers because the code that first
 * meets the bad input (a device opening its disk image, a config planner, the command line) sits
 * in several of them. A failed system call is a `SysError`, next to errno in `libc.ts`.
 *
 * @module
 */

/**
 * A problem with the user's input (a flag, a config field, a file they named): `vhostd` reports
 * its message as one line and exits with code 2.
 */
export class UsageError extends Error {
  /** Builds the error; `message` is the whole line the user sees. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}
