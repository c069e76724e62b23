/**
 * `vhostd resize`: after a disk image grew, asks the running daemon to read its size again and
 * tell the guest, which sees the new capacity without a reboot (SIGHUP does the same for every
 * device).
 *
 * @module
 */

import { parseArgs } from "./args.ts";
import { usage } from "./cli.ts";
import { CONTROL_SOCKET } from "./config.ts";
import { requestResize } from "./control.ts";
import { controlPathOf, controlPathOptions } from "./status.ts";

/** `vhostd resize --help`. */
export const RESIZE_HELP =
  `Usage: vhostd resize (--config FILE | --socket-dir DIR | --control PATH) [--device ID]

After a disk image (or block device) was grown, e.g. with "truncate -s +10G" or
"qemu-img resize", asks the running vhostd to read its size again. A disk that grew serves
the new capacity and tells QEMU, which tells the guest: the guest sees the new size without a
reboot (Linux logs "capacity change"; grow the partition and file system there). A smaller
image is refused: the guest keeps the old size. The daemon is reached through its control
socket (${CONTROL_SOCKET} in the socket folder for "run"; "--control PATH" for the other
commands). "kill -HUP" on the daemon does the same for every device, without an answer.

Options:
  --config FILE       the VM config the daemon runs ("run --config FILE")
  --socket-dir DIR    the daemon's socket folder (asks DIR/${CONTROL_SOCKET})
  --control PATH      the control socket itself
  --device ID         only this device (default: every device; the others have nothing to do)
  --json              print the daemon's answer as JSON
  -h, --help          show this text

Example:
  truncate -s +10G /var/lib/vm1/disk0.img
  vhostd resize --config /etc/vhostd/vm1.json --device disk0
`;

/** `vhostd resize`. */
export async function cmdResize(args: string[]): Promise<number> {
  const { values } = usage(() =>
    parseArgs({
      args,
      strict: true,
      options: {
        ...controlPathOptions,
        device: { type: "string" },
        json: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    })
  );
  if (values.help) {
    console.log(RESIZE_HELP);
    return 0;
  }
  const report = await requestResize(controlPathOf(values, "resize"), values.device);
  if (values.json) console.log(JSON.stringify(report, null, 2));
  else for (const d of report.devices) console.log(`${d.device}: ${d.message}`);
  return 0;
}
