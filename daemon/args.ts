/**
 * The command line parser of every `vhostd` command: the part of `node:util`'s `parseArgs` the
 * commands use (strict long options, string or boolean, repeatable, one-letter short forms),
 * with its error messages. It exists because importing `node:util` costs every daemon about
 * 1.2 MiB of resident memory (Deno's Node compatibility layer), for a few dozen lines of parsing.
 *
 * @module
 */

import { UsageError } from "../sys/errors.ts";

/** One option: `--name VALUE` / `--name=VALUE` (string) or `--name` (boolean). */
export interface ArgOption {
  /** What the option takes. */
  readonly type: "string" | "boolean";
  /** A one-letter alias, given as `-x`. */
  readonly short?: string;
  /** Whether it may be given more than once (the values are then collected in order). */
  readonly multiple?: boolean;
}

type ValueOf<O extends ArgOption> = O["type"] extends "boolean" ? boolean : string;

/** The parsed values of options `T`: absent ones are undefined. */
export type ArgValues<T extends Record<string, ArgOption>> = {
  -readonly [K in keyof T]?: T[K] extends { readonly multiple: true } ? ValueOf<T[K]>[]
    : ValueOf<T[K]>;
};

/** What {@link parseArgs} is given. */
export interface ParseArgsConfig<T extends Record<string, ArgOption>> {
  /** The arguments (after the command's name). */
  args: string[];
  /** The options accepted; any other is an error. */
  options: T;
  /** Always strict (accepted for the callers written against `node:util`). */
  strict?: true;
  /** Whether arguments that are not options are accepted (default false). */
  allowPositionals?: boolean;
}

/**
 * Parses `config.args`. Throws a {@link UsageError} naming the first problem: an unknown option,
 * a string option without its value, a boolean option given a value, or an unexpected argument.
 * A value that starts with "-" must be attached (`--name=-x`), as with `node:util`.
 */
export function parseArgs<T extends Record<string, ArgOption>>(
  config: ParseArgsConfig<T>,
): { values: ArgValues<T>; positionals: string[] } {
  const { args, options } = config;
  const values: Record<string, string | boolean | (string | boolean)[]> = Object.create(null);
  const positionals: string[] = [];
  const shorts = new Map<string, string>();
  for (const name of Object.keys(options)) {
    const short = options[name].short;
    if (short !== undefined) shorts.set(short, name);
  }
  const store = (name: string, value: string | boolean) => {
    if (options[name].multiple) {
      const list = values[name];
      if (Array.isArray(list)) list.push(value);
      else values[name] = [value];
    } else {
      values[name] = value;
    }
  };
  const positional = (arg: string) => {
    if (!config.allowPositionals) {
      throw new UsageError(
        `Unexpected argument '${arg}'. This command does not take positional arguments`,
      );
    }
    positionals.push(arg);
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      for (const rest of args.slice(i + 1)) positional(rest);
      break;
    }
    let name: string | undefined;
    let inline: string | undefined;
    if (arg.startsWith("--")) {
      const eq = arg.indexOf("=");
      name = eq < 0 ? arg.slice(2) : arg.slice(2, eq);
      inline = eq < 0 ? undefined : arg.slice(eq + 1);
      if (!Object.hasOwn(options, name)) {
        throw new UsageError(`Unknown option '--${name}'`);
      }
    } else if (arg.startsWith("-") && arg.length > 1) {
      name = arg.length === 2 ? shorts.get(arg[1]) : undefined;
      if (name === undefined) throw new UsageError(`Unknown option '${arg}'`);
    } else {
      positional(arg);
      continue;
    }
    const spelled = `--${name}`;
    if (options[name].type === "boolean") {
      if (inline !== undefined) {
        throw new UsageError(`Option '${spelled}' does not take an argument`);
      }
      store(name, true);
      continue;
    }
    if (inline !== undefined) {
      store(name, inline);
      continue;
    }
    const value = args[i + 1];
    if (value === undefined) throw new UsageError(`Option '${spelled} <value>' argument missing`);
    if (value.startsWith("-")) {
      throw new UsageError(
        `Option '${spelled}' argument is ambiguous; to give a value starting with "-", write ` +
          `'${spelled}=${value}'`,
      );
    }
    store(name, value);
    i++;
  }
  return { values: values as ArgValues<T>, positionals };
}
