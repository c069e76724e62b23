/**
 * The libc bindings vhostd uses, through Deno FFI: sockets with fd passing, mappings, eventfd and
 * epoll, scatter-gather file I/O, and errno as a typed error.
 *
 * @module
 */

export * from "./libc.ts";
export * from "./socket.ts";
export * from "./event.ts";
export * from "./mman.ts";
export * from "./io.ts";
