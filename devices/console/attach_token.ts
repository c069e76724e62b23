/**
 * The secret a client of a TCP attach socket must send before anything else. TCP carries no
 * peer credentials, and any local user (or anyone who reaches a non-loopback address) can
 * connect; whoever attaches sees the console and types into the guest.
 *
 * The client's first line (ended by CR or LF, as Enter sends in a raw terminal or a pipe) must be
 * the token; until it is, the client gets nothing and its bytes reach nobody.
 *
 * @module
 */

/** Shortest token accepted, in bytes: 16 random bytes are out of reach of guessing. */
export const MIN_TOKEN_BYTES = 16;
/** Longest token accepted, in bytes; also the most a client may send before its line ends. */
export const MAX_TOKEN_BYTES = 256;
/** How long a TCP client has to send the token, in milliseconds. */
export const TOKEN_DEADLINE_MS = 10_000;

/** Reads and checks a token file's content; throws an Error saying what is wrong with it. */
export function parseToken(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
  let end = bytes.length;
  while (
    end > 0 && (bytes[end - 1] === 0x0a || bytes[end - 1] === 0x0d || bytes[end - 1] === 0x20)
  ) {
    end--;
  }
  const token = new Uint8Array(bytes.subarray(0, end));
  if (token.length < MIN_TOKEN_BYTES || token.length > MAX_TOKEN_BYTES) {
    throw new Error(
      `must hold one line of ${MIN_TOKEN_BYTES} to ${MAX_TOKEN_BYTES} bytes, not ${token.length}`,
    );
  }
  if (token.includes(0x0a) || token.includes(0x0d)) {
    throw new Error("must hold one line (a client sends the token as its first line)");
  }
  return token;
}

/** Where a client's first line stands. */
export type TokenProgress =
  | { state: "waiting" }
  | { state: "accepted"; rest: Uint8Array }
  | { state: "refused"; why: string };

/** One TCP client's progress through the token line. */
export class TokenCheck {
  /** When the client must have sent its line (milliseconds, `performance.now()`). */
  readonly deadline: number;
  readonly #token: Uint8Array;
  readonly #line = new Uint8Array(MAX_TOKEN_BYTES + 1);
  #length = 0;

  /** Expects `token`, from a client connected `now`. */
  constructor(token: Uint8Array, now: number = performance.now()) {
    this.#token = token;
    this.deadline = now + TOKEN_DEADLINE_MS;
  }

  /** Takes bytes the client sent; says whether its line is complete and right. */
  feed(data: Uint8Array): TokenProgress {
    let end = data.findIndex((b) => b === 0x0a || b === 0x0d);
    const take = end < 0 ? data.length : end;
    if (this.#length + take > MAX_TOKEN_BYTES) return { state: "refused", why: "wrong token" };
    this.#line.set(data.subarray(0, take), this.#length);
    this.#length += take;
    if (end < 0) return { state: "waiting" };
    if (!this.#matches()) return { state: "refused", why: "wrong token" };
    // CR LF is one Enter; a lone LF or CR too.
    if (data[end] === 0x0d && data[end + 1] === 0x0a) end++;
    return { state: "accepted", rest: data.subarray(end + 1) };
  }

  /** Compares in time that depends on the token's length only, not on where a guess goes wrong. */
  #matches(): boolean {
    const token = this.#token;
    let diff = this.#length ^ token.length;
    for (let i = 0; i < token.length; i++) diff |= token[i] ^ this.#line[i];
    return diff === 0;
  }
}
