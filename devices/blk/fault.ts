/**
 * Fault injection for the crash-restart tests, kept out of the request path: the device takes
 * its requests through a function chosen once when it is built, and only a device built with
 * `faultKillAfter` (the environment variable VHOSTD_FAULT_KILL_AFTER) gets the one below.
 *
 * @module
 */

import type { DescriptorChain, Virtqueue } from "../device.ts";

/** How a block device takes the next request from a queue. */
export type TakeRequest = (queue: Virtqueue) => DescriptorChain | null;

/** The normal way: the next available chain. */
export const popRequest: TakeRequest = (queue) => queue.pop();

/**
 * Pops like {@link popRequest}, but SIGKILLs this process right after taking the `n`th request,
 * before it is completed: a restart must then find it in the inflight buffer and resubmit it.
 */
export function killAfterRequests(n: number): TakeRequest {
  let left = n;
  return (queue) => {
    const chain = queue.pop();
    if (chain !== null && --left === 0) Deno.kill(Deno.pid, "SIGKILL");
    return chain;
  };
}
