/**
 * The operations examples are valid as shipped: the libvirt domain against libvirt's own schema
 * and defined by libvirt itself, the QEMU scripts as bash, the config through `run --check` (see
 * run_config_test.ts). libvirt_guest_test.ts boots the two together.
 */

import assert from "node:assert/strict";

const EXAMPLES = new URL("../examples/", import.meta.url).pathname;

async function run(cmd: string, args: string[]): Promise<{ code: number; output: string }> {
  const out = await new Deno.Command(cmd, { args }).output();
  const dec = new TextDecoder();
  return { code: out.code, output: dec.decode(out.stdout) + dec.decode(out.stderr) };
}

Deno.test("examples/libvirt/vm1.xml is well-formed and a valid libvirt domain", async () => {
  const file = `${EXAMPLES}/libvirt/vm1.xml`;
  const lint = await run("xmllint", ["--noout", file]);
  assert.equal(lint.code, 0, lint.output);
  const schema = await run("virt-xml-validate", [file, "domain"]);
  assert.equal(schema.code, 0, schema.output);
  const xml = Deno.readTextFileSync(file);
  assert.match(xml, /<disk type='vhostuser' device='disk'>/);
  assert.match(xml, /<interface type='vhostuser'>/);
  assert.match(xml, /<source type='memfd'\s*\/>\s*<access mode='shared'\s*\/>/);
});

Deno.test("examples/libvirt/vm1.xml is accepted by libvirt (virsh define, test driver)", async () => {
  // The schema accepts what libvirt's own checks refuse (boot order on a device and in <os>,
  // <readonly/> on a vhost-user disk); libvirt's test driver runs those checks, no daemon needed.
  const r = await run("virsh", ["-c", "test:///default", "define", `${EXAMPLES}/libvirt/vm1.xml`]);
  assert.equal(r.code, 0, r.output);
  assert.match(r.output, /Domain 'vm1' defined/);
});

Deno.test("examples/libvirt/vm1.xml and vhostd@vm1.socket.d use the sockets vm1.json serves", () => {
  const config = JSON.parse(Deno.readTextFileSync(`${EXAMPLES}/config/vm1.json`));
  const served = config.devices.map((d: { id: string; socket?: string }) =>
    `${config.socketDir}/${d.socket ?? `${d.id}.sock`}`
  ).sort();
  const xml = Deno.readTextFileSync(`${EXAMPLES}/libvirt/vm1.xml`);
  const attached = [...xml.matchAll(/<source type='unix' path='([^']+)'/g)].map((m) => m[1]).sort();
  assert.deepEqual(attached, served);
  const conf = Deno.readTextFileSync(`${EXAMPLES}/systemd/vhostd@vm1.socket.d/sockets.conf`);
  const listened = [...conf.matchAll(/^ListenStream=(.+)$/gm)].map((m) => m[1]).sort();
  assert.deepEqual(listened, served);
});

Deno.test("examples/qemu scripts parse as bash", async () => {
  for (const name of ["vm1.sh", "run-vhostd.sh"]) {
    const r = await run("bash", ["-n", `${EXAMPLES}/qemu/${name}`]);
    assert.equal(r.code, 0, `${name}: ${r.output}`);
  }
});

Deno.test("the README's config file is examples/config/vm1.json", () => {
  const readme = Deno.readTextFileSync(new URL("../README.md", import.meta.url));
  const section = readme.slice(readme.indexOf("### The config file"));
  const snippet = /```json\n([\s\S]*?)```/.exec(section)?.[1];
  assert.ok(snippet !== undefined, "no JSON block under ### The config file");
  const example = Deno.readTextFileSync(`${EXAMPLES}/config/vm1.json`);
  assert.deepEqual(JSON.parse(snippet), JSON.parse(example));
});
