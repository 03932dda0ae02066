#!/usr/bin/env python3
"""How fast can a durable log write on this disk, by write mode? A probe for the agent buffer's design.

Closed-loop writers (as the buffer's sources are) each write one append and wait until it is durable before
writing the next, into a file whose blocks are already allocated (as in a recycled segment):

  buffered       pwrite through the page cache; a commit thread fdatasyncs back to back, and a writer waits for
                 a sync that started after its write (the buffer's `batch` group commit)
  buffered_dsync pwrite with O_DSYNC: every writer syncs its own write, several at once
  direct         O_DIRECT pwrite, then the same group commit as `buffered`
  direct_dsync   O_DIRECT | O_DSYNC: every write goes to the device and is durable when the call returns

Nothing is encoded or read back: this is the disk's side only. Python threads release the GIL in pwrite and
fdatasync, so the writers do run at once.

  python3 scripts/durable_write_modes.py [dir] [writers] [append KiB] [seconds]

prints MB/s per mode and `dd … conv=fdatasync` of 512 MiB right before and after, for comparison.
"""

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import time

MODES = ["buffered", "buffered_dsync", "direct", "direct_dsync"]
FILE_BYTES = 512 << 20
BLOCK = 4096


def prepare(path):
    """Allocates and writes the whole file once, so that the modes overwrite blocks the file already owns."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC)
    block = os.urandom(1 << 20)
    for offset in range(0, FILE_BYTES, len(block)):
        os.pwrite(fd, block, offset)
    os.fsync(fd)
    os.close(fd)


def run(path, mode, writers, append_bytes, seconds):
    flags = os.O_RDWR
    if mode.startswith("direct"):
        flags |= os.O_DIRECT
    if mode.endswith("dsync"):
        flags |= os.O_DSYNC
    fd = os.open(path, flags)
    data = mmap.mmap(-1, append_bytes)  # page-aligned, as O_DIRECT needs
    data.write(os.urandom(append_bytes))
    state = threading.Condition()
    syncs = {"started": 0, "finished": 0}
    position = [0]
    written = [0]
    stop = threading.Event()
    group_commit = not mode.endswith("dsync")

    def writer():
        while not stop.is_set():
            with state:
                offset = position[0]
                position[0] = (position[0] + append_bytes) % (FILE_BYTES - append_bytes)
            os.pwrite(fd, data, offset)
            if group_commit:
                with state:
                    needed = syncs["started"] + 1
                    state.notify_all()
                    while syncs["finished"] < needed and not stop.is_set():
                        state.wait()
            with state:
                written[0] += append_bytes

    def committer():
        while not stop.is_set():
            with state:
                syncs["started"] += 1
                started = syncs["started"]
            os.fdatasync(fd)
            with state:
                syncs["finished"] = started
                state.notify_all()

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    if group_commit:
        threads.append(threading.Thread(target=committer))
    start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    with state:
        state.notify_all()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    os.close(fd)
    return written[0] / elapsed / 1e6


def dd(directory):
    target = os.path.join(directory, "dd.bin")
    start = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=512", "conv=fdatasync", "status=none"], check=True
    )
    elapsed = time.monotonic() - start
    os.unlink(target)
    return (512 << 20) / elapsed / 1e6


def main():
    parser = argparse.ArgumentParser(description="MB/s a durable log gets from this disk, per write mode.")
    parser.add_argument("dir", nargs="?", default=tempfile.gettempdir(), help="where to write (default: temp dir)")
    parser.add_argument("writers", nargs="?", type=int, default=4, help="closed-loop writers (default 4)")
    parser.add_argument("append_kib", nargs="?", type=int, default=260, help="append size in KiB (default 260)")
    parser.add_argument("seconds", nargs="?", type=float, default=3, help="seconds per mode (default 3)")
    args = parser.parse_args()
    if args.writers < 1 or args.append_kib < 1 or args.seconds <= 0:
        parser.error("writers, append_kib and seconds must be positive")
    if args.append_kib << 10 > FILE_BYTES // 2:
        parser.error(f"append_kib must be at most {FILE_BYTES // 2 >> 10}")
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a directory")
    directory, writers, seconds = args.dir, args.writers, args.seconds
    append_bytes = (args.append_kib << 10) + BLOCK - 1
    append_bytes = append_bytes // BLOCK * BLOCK
    with tempfile.TemporaryDirectory(dir=directory) as work:
        path = os.path.join(work, "log.bin")
        prepare(path)
        subprocess.run(["sync"], check=True)
        # The first `dd` after writing the file runs at a fraction of the next one's speed, every time: not counted.
        dd(work)
        before = dd(work)
        results = {mode: run(path, mode, writers, append_bytes, seconds) for mode in MODES}
        after = dd(work)
    print(f"{writers} writers, {append_bytes >> 10} KiB appends; dd {before:.0f} MB/s before, {after:.0f} after")
    for mode, mbps in results.items():
        print(f"  {mode:15} {mbps:6.0f} MB/s = {100 * mbps / ((before + after) / 2):.0f}% of dd")


if __name__ == "__main__":
    main()
