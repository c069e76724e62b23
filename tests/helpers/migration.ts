/**
 * What the live-migration tests run in the guest, and how the host steers it.
 *
 * Two things run at once. fio writes random 4 KiB blocks and verifies them as it goes (the
 * "random-write workload that verifies what it wrote"). And a check built to catch a back-end
 * that does not log the guest pages it writes: when the host says so (during a migration, after
 * QEMU's first pass over guest RAM), the guest drops its page cache and reads a 32 MiB region of
 * the disk through it, so that the device fills thousands of fresh cache pages; from then on
 * every round checks each MiB of the region again, from the page cache, against checksums taken
 * at boot. A page the device filled after QEMU copied it, and that the back-end did not log, is
 * never copied again: on the destination the check reads what the page held before.
 *
 * The host steers the guest by typing commands into its serial console, one a line (the guest
 * waits for one for a second each round): `READ<n>` asks for read number n, `STOP` ends the
 * workload. After a migration the host types into the destination QEMU's console.
 *
 * @module
 */

/** MiB of the region read through the page cache. */
const REGION_MIB = 32;
/** Where fio works (after the region), and how much. */
const FIO_OFFSET_MIB = 40;
const FIO_SIZE_MIB = 8;
/** The smallest disk the workload fits on. */
export const WORKLOAD_DISK_BYTES = 64 * 1024 * 1024;

/**
 * The guest script. It prints `ROUND <n> checked=<k> errors=<e>` after each round,
 * `READ <n> DONE` after each read the host asked for, `VERIFY-ERROR ...` for every MiB that read
 * back wrong, `FIO-FAILED` if fio found an error, and `RESULT key=value` lines at the end; it exits
 * non-zero if anything was wrong. `dev` is the disk (`/dev/vda`).
 */
export function migrationWorkload(dev = "/dev/vda"): string {
  return `
set -u
dev=${dev}
N=${REGION_MIB}
errors=0; checked=0; round=0; reads=0
# Held open for the whole run: Linux drops a block device's page cache when its last opener
# closes it, and the check needs that cache to last.
exec 3<$dev
# Checksums of the region, read past the page cache.
i=0; : > /tmp/sums
while [ $i -lt $N ]; do
  dd if=$dev bs=1M skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1 >> /tmp/sums
  i=$((i + 1))
done
(
  while [ ! -f /tmp/stop ]; do
    # invalidate=0: by default fio drops the whole disk's page cache (BLKFLSBUF) as it starts.
    fio --name=rw --filename=$dev --offset=${FIO_OFFSET_MIB}M --size=${FIO_SIZE_MIB}M \
      --rw=randwrite --bs=4k --direct=1 --ioengine=psync --verify=crc32c --verify_backlog=64 \
      --invalidate=0 --output=/tmp/fio.out </dev/null >/tmp/fio.err 2>&1 ||
      { echo "FIO-FAILED $?"; tail -n 3 /tmp/fio.err; grep -i -m3 'verify\|err' /tmp/fio.out; }
  done
  touch /tmp/fio.done
) &
echo WORKLOAD-STARTED
while :; do
  m=""
  read -t 1 -r m
  case "$m" in
    STOP*) break ;;
    READ*)
      n=\${m#READ}
      if [ "$n" != "$reads" ]; then
        echo 3 > /proc/sys/vm/drop_caches
        dd if=$dev of=/dev/null bs=1M count=$N 2>/dev/null
        reads=$n
        echo "READ $n DONE"
      fi ;;
  esac
  round=$((round + 1))
  if [ "$reads" != 0 ]; then
    i=0
    while [ $i -lt $N ]; do
      got=$(dd if=$dev bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
      want=$(sed -n "$((i + 1))p" /tmp/sums)
      checked=$((checked + 1))
      [ "$got" = "$want" ] || { errors=$((errors + 1)); echo "VERIFY-ERROR round=$round mib=$i"; }
      i=$((i + 1))
    done
  fi
  echo "ROUND $round checked=$checked errors=$errors"
done
touch /tmp/stop
while [ ! -f /tmp/fio.done ]; do sleep 1; done
echo "RESULT rounds=$round"
echo "RESULT checked=$checked"
echo "RESULT verify_errors=$errors"
[ $errors -eq 0 ]
`;
}

/** The round numbers the console reports (`ROUND <n> ...`), in order. */
export function rounds(console: string): number[] {
  return [...console.matchAll(/^ROUND (\d+) /gm)].map((m) => Number(m[1]));
}
