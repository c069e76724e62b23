/**
 * The vhost-user protocol: message codecs, one connection, the back-end state machine and its
 * server loop. Internal to vhostd (not a package export); the front-end is `./frontend/mod.ts`.
 *
 * @module
 */

export * from "./message.ts";
export * from "./connection.ts";
export * from "./backend.ts";
export * from "./server.ts";
