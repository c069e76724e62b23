/**
 * QEMU's back-end program conventions (docs/interop/vhost-user.rst, "Backend program
 * conventions"): tools that start and discover vhost-user back-ends call them with
 * `--print-capabilities`, `--socket-path PATH` and `--fd N`, and for block devices `--blk-file`
 * and `--read-only`. vhostd's blk, net and console commands answer to them.
 */

import assert from "node:assert/strict";
import { daemonFile, DaemonProcess, runVhostd, sparseFile, withDir } from "./helpers/daemon.ts";
import { FrontendConnection } from "../vhost-user/frontend/connection.ts";

/** VHostUserBackendType in QEMU's docs/interop/vhost-user.json. */
const BACKEND_TYPES = [
  "9p",
  "balloon",
  "block",
  "caif",
  "console",
  "crypto",
  "gpu",
  "input",
  "net",
  "rng",
  "rpmsg",
  "rproc-serial",
  "scsi",
  "vsock",
  "fs",
];

const VIRTIO_BLK_F_RO = 1n << 5n;

Deno.test("--print-capabilities answers in the schema's JSON and ignores every other option", async () => {
  const want: Record<string, unknown> = {
    blk: { type: "block", features: ["read-only", "blk-file"] },
    net: { type: "net" },
    console: { type: "console" },
  };
  for (const [command, capabilities] of Object.entries(want)) {
    // Other options, even unknown or incomplete ones, are ignored by the conventions.
    const r = await runVhostd([command, "--bogus", "--print-capabilities", "--socket"]);
    assert.equal(r.code, 0, `${command}: ${r.stderr}`);
    const printed: { type: string } = JSON.parse(r.stdout);
    assert.deepEqual(printed, capabilities, command);
    assert.ok(BACKEND_TYPES.includes(printed.type), printed.type);
  }
});

Deno.test("blk: --socket-path, --blk-file and --read-only serve as the conventions say", () =>
  withDir("vhostd-conv-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const d = await DaemonProcess.start([
      "blk",
      "--socket-path",
      `${dir}/s.sock`,
      "--blk-file",
      `${dir}/d.img`,
      "--read-only",
    ]);
    try {
      const fe = await FrontendConnection.connect(`${dir}/s.sock`);
      try {
        assert.ok(fe.getFeatures() & VIRTIO_BLK_F_RO, "read-only offered");
      } finally {
        fe.close();
      }
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
    assert.throws(() => Deno.statSync(`${dir}/s.sock`), Deno.errors.NotFound);
  }));

Deno.test("the conventions' options are alternatives to vhostd's own, never both", () =>
  withDir("vhostd-conv-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const cases: [string[], RegExp][] = [
      [
        ["blk", "--socket", `${dir}/a.sock`, "--socket-path", `${dir}/b.sock`, "--image", "x"],
        /--socket, --socket-path and --fd are alternatives/,
      ],
      [
        ["blk", "--socket-path", `${dir}/a.sock`, "--image", "x", "--blk-file", "y"],
        /--image and --blk-file are the same option/,
      ],
      [["net", "--socket-path", `${dir}/a.sock`, "--fd", "3", "--tap", "t0"], /alternatives/],
      [["console", "--socket-path", `${dir}/a.sock`, "--socket", `${dir}/b.sock`], /alternatives/],
    ];
    for (const [args, message] of cases) {
      const r = await runVhostd(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    }
  }));

Deno.test("the README's vhostd-blk install gives the program its descriptor file names", async () => {
  const readme = Deno.readTextFileSync(daemonFile("README.md"));
  const line = readme.split("\n").find((l) => l.includes("--name vhostd-blk "));
  assert.ok(line, "the README installs vhostd-blk");
  const descriptor = JSON.parse(
    Deno.readTextFileSync(daemonFile("examples/vhost-user/50-vhostd-blk.json")),
  );
  assert.equal(descriptor.type, "block");
  const prefix = await Deno.makeTempDir({ prefix: "vhostd-install-" });
  try {
    const args = line.split(" ").slice(1).map((a) => a === "/usr/local" ? prefix : a);
    const install = await new Deno.Command(Deno.execPath(), { args, cwd: daemonFile("") })
      .output();
    assert.equal(install.code, 0, new TextDecoder().decode(install.stderr));
    // The descriptor's binary, moved to the scratch prefix, is what a tool runs.
    const binary = descriptor.binary.replace("/usr/local", prefix);
    const out = await new Deno.Command(binary, {
      args: ["--print-capabilities"],
      env: { PATH: `${Deno.execPath().replace(/\/[^/]*$/, "")}:/usr/bin:/bin` },
    }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    assert.deepEqual(JSON.parse(new TextDecoder().decode(out.stdout)).type, descriptor.type);
  } finally {
    await Deno.remove(prefix, { recursive: true });
  }
});

Deno.test("blk --fd N serves the listening socket it inherited, and leaves its file alone", () =>
  withDir("vhostd-conv-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const socket = `${dir}/given.sock`;
    // systemd-socket-activate binds the socket and starts the program, on the first connection,
    // with it as fd 3; the LISTEN_* variables are dropped so that only --fd tells vhostd.
    const env = ["NO_COLOR", "HOME", "PATH", "DENO_DIR"].filter((v) => Deno.env.get(v));
    const d = DaemonProcess.spawnUnder(
      [
        "systemd-socket-activate",
        "-l",
        socket,
        ...env.flatMap((v) => ["-E", v]),
        "sh",
        "-c",
        'unset LISTEN_FDS LISTEN_PID LISTEN_FDNAMES; exec "$@"',
        "sh",
      ],
      ["run", "-A", daemonFile("daemon/main.ts"), "blk", "--fd", "3", "--blk-file", `${dir}/d.img`],
    );
    try {
      await d.waitFor(() => d.stderr.includes("Listening on"), 30_000, "the listening socket");
      const fe = await FrontendConnection.connect(socket, { timeoutMs: 60_000 });
      try {
        assert.ok(fe.getFeatures() & (1n << 32n), "VIRTIO_F_VERSION_1 offered");
      } finally {
        fe.close();
      }
      await d.waitFor(() => d.stdout.includes("vhostd: serving"), 30_000, "the banner");
      assert.match(d.stdout, new RegExp(`on ${socket.replaceAll(".", "\\.")}`));
    } finally {
      assert.equal(await d.stop(), 0, d.stderr);
    }
    // The socket is the management layer's: vhostd does not remove it.
    assert.ok(Deno.statSync(socket).isSocket, "the inherited socket's file is still there");
  }));

Deno.test("--fd that is not a listening Unix socket is one clear error", () =>
  withDir("vhostd-conv-", async (dir) => {
    sparseFile(`${dir}/d.img`, 1 << 20);
    const cases: [string, RegExp][] = [
      ["2", /--fd must be a whole number from 3/],
      // (an fd no one opened: low numbers are Deno's own in the daemon)
      ["900", /--fd 900 is not a listening Unix stream socket: .*EBADF/],
    ];
    for (const [fd, message] of cases) {
      const r = await runVhostd(["blk", "--fd", fd, "--image", `${dir}/d.img`]);
      assert.equal(r.code, 2, r.stderr);
      assert.match(r.stderr, message);
      assert.equal(r.stderr.trim().split("\n").length, 1, r.stderr);
    }
  }));
