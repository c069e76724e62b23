/**
 * A monotonic clock for the data plane's latency histograms.
 *
 * `clock_gettime` through synchronous FFI (served by the vDSO, no system call) measured 45–90 ns
 * here against 105–170 ns for `performance.now()`, and it is read once per request.
 *
 * @module
 */

import { libc } from "./libc.ts";

/** clock_gettime's and timerfd_create's monotonic clock (time since boot, never set back). */
export const CLOCK_MONOTONIC = 1;
/** struct timespec: tv_sec (i64) then tv_nsec (i64), read as i32 halves: both fit. */
const ts = new Int32Array(4);

/** Milliseconds (with a fraction) since an arbitrary point (boot); never 0 once running. */
export function monotonicMs(): number {
  libc.clock_gettime(CLOCK_MONOTONIC, ts);
  return ts[0] * 1000 + ts[2] / 1e6;
}
