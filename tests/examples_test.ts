/**
 * The operations examples are valid as shipped: the libvirt domain against libvirt's own schema,
 * the QEMU scripts as bash, the config through `run --check` (see run_config_test.ts).
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

Deno.test("examples/qemu scripts parse as bash", async () => {
  for (const name of ["vm1.sh", "run-vhostd.sh"]) {
    const r = await run("bash", ["-n", `${EXAMPLES}/qemu/${name}`]);
    assert.equal(r.code, 0, `${name}: ${r.output}`);
  }
});
