/**
 * vhostd's version, read from deno.json (the one place it is written), for `vhostd --version`,
 * the status output and the `vhostd_build_info` metric.
 *
 * @module
 */

import manifest from "../deno.json" with { type: "json" };

/** vhostd's version (deno.json's `version`). */
export const VERSION: string = manifest.version;

/** What `vhostd --version` prints: vhostd's, Deno's, V8's and TypeScript's versions. */
export function versionText(): string {
  return `vhostd ${VERSION}\ndeno ${Deno.version.deno}\nv8 ${Deno.version.v8}\n` +
    `typescript ${Deno.version.typescript}`;
}
