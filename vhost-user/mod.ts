/**
 * The vhost-user protocol: message codecs, one connection, the back-end state machine and its
 * server loop.
 *
 * @module
 */

export * from "./message.ts";
export * from "./connection.ts";
export * from "./backend.ts";
export * from "./server.ts";
export * as frontend from "./frontend/mod.ts";
