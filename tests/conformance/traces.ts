/**
 * Reading the QEMU 7.2 traces recorded on the test machine (copied from shared/research/traces)
 * into the list of messages QEMU sent, so a replay can be compared with them message for message.
 *
 * Two formats: QEMU's own `-trace vhost_user_write` lines (`vhost_user_write req:1 flags:0x1`),
 * and the tracer back-end's decoded lines (`0.027 GET_FEATURES flags=0x1 ...`).
 *
 * @module
 */

import { Request } from "../../vhost-user/message.ts";

/** One message the front-end sent. */
export interface SentMessage {
  /** Request id. */
  request: number;
  /** Header flags. */
  flags: number;
}

/** A trace split at the points where the front-end reconnected. */
export type TraceSessions = SentMessage[][];

/** Reads a trace from tests/conformance/traces/, one list of messages per connection. */
export function readTrace(name: string): TraceSessions {
  const text = Deno.readTextFileSync(new URL(`./traces/${name}`, import.meta.url));
  const sessions: TraceSessions = [[]];
  for (const line of text.split("\n")) {
    let m = /^vhost_user_write req:(\d+) flags:0x([0-9a-f]+)/.exec(line);
    if (m) {
      sessions.at(-1)!.push({ request: Number(m[1]), flags: parseInt(m[2], 16) });
      continue;
    }
    if (/Unable to connect character device|^\s*[\d.]+ EOF/.test(line)) sessions.push([]);
    m = /^\s*[\d.]+ ([A-Z_]+)\s+flags=0x([0-9a-f]+)/.exec(line);
    if (m) {
      const id = (Request as Record<string, number>)[m[1]];
      if (id === undefined) throw new Error(`unknown request ${m[1]} in ${name}`);
      sessions.at(-1)!.push({ request: id, flags: parseInt(m[2], 16) });
    }
  }
  return sessions.filter((s) => s.length > 0);
}

/** Renders messages as `NAME/0xF` words, for readable assertion diffs. */
export function render(ms: readonly SentMessage[]): string[] {
  const names = new Map<number, string>(Object.entries(Request).map(([k, v]) => [v, k]));
  return ms.map((m) => `${names.get(m.request) ?? m.request}/0x${m.flags.toString(16)}`);
}
