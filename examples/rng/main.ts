/**
 * A virtio-rng (entropy) device in one file, written only against vhostd's public API.
 *
 *   deno run -A examples/rng/main.ts --socket /tmp/rng.sock
 *   qemu-system-x86_64 ... -chardev socket,id=rng0,path=/tmp/rng.sock \
 *     -device vhost-user-rng-pci,chardev=rng0
 *
 * The guest posts empty, device-writable buffers on its one queue; the device fills them with
 * random bytes and hands them back. vhostd does the rest: the vhost-user conversation, mapping
 * guest memory, parsing and bounds-checking descriptor chains, and interrupting the guest.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { serveDevice, type VirtioDevice, type Virtqueue } from "../../mod.ts";

/** virtio device id of an entropy source. */
const VIRTIO_ID_RNG = 4;
/** crypto.getRandomValues fills at most 64 KiB per call. */
const MAX_RANDOM_CHUNK = 65536;

/** Builds the device; vhostd calls this inside its data-plane worker. */
export function createDevice(): VirtioDevice {
  return {
    deviceId: VIRTIO_ID_RNG,
    name: "rng",
    numQueues: 1,
    features: 0n, // virtio-rng has no feature bits of its own and no config space
    processQueue(queue: Virtqueue): void {
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) {
        let written = 0;
        for (const buffer of chain.writableViews()) {
          for (let off = 0; off < buffer.length; off += MAX_RANDOM_CHUNK) {
            crypto.getRandomValues(buffer.subarray(off, off + MAX_RANDOM_CHUNK));
          }
          written += buffer.length;
        }
        queue.push(chain, written);
      }
    },
  };
}

if (import.meta.main) {
  const { values } = parseArgs({ options: { socket: { type: "string" } } });
  if (!values.socket) {
    console.error("usage: deno run -A examples/rng/main.ts --socket PATH");
    Deno.exit(2);
  }
  Deno.exit(await serveDevice({ socket: values.socket, module: import.meta.url, name: "rng" }));
}
