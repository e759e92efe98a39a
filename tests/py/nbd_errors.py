#!/usr/bin/env python3
"""Error cases through libnbd with strict mode off, so libnbd sends what a buggy client would.

Usage: nbd_errors.py RW_URI RO_URI. Prints one line per case and exits non-zero on the
first errno that differs from what the NBD spec asks for.
"""
import errno
import sys

import nbd


def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)  # no client-side checks: the server must catch everything
    h.connect_uri(uri)
    return h


def expect_errno(name, want, fn):
    try:
        fn()
    except nbd.Error as e:
        if e.errnum != want:
            sys.exit(f"FAIL {name}: errno {e.errnum} ({e}), want {errno.errorcode[want]}")
        print(f"ok   {name}: {errno.errorcode[want]}")
        return
    sys.exit(f"FAIL {name}: succeeded, want {errno.errorcode[want]}")


def main():
    rw_uri, ro_uri = sys.argv[1], sys.argv[2]
    h = connect(rw_uri)
    size = h.get_size()
    h.pwrite(b"\x5a" * 4096, 0)

    expect_errno("read past end", errno.EINVAL, lambda: h.pread(4096, size))
    expect_errno("read straddling end", errno.EINVAL, lambda: h.pread(8192, size - 4096))
    expect_errno("write past end", errno.ENOSPC, lambda: h.pwrite(b"x" * 4096, size))
    expect_errno("zero past end", errno.ENOSPC, lambda: h.zero(4096, size))
    expect_errno("trim past end", errno.ENOSPC, lambda: h.trim(4096, size))
    expect_errno("misaligned read offset", errno.EINVAL, lambda: h.pread(512, 1))
    expect_errno("misaligned read length", errno.EINVAL, lambda: h.pread(100, 0))
    expect_errno("misaligned write", errno.EINVAL, lambda: h.pwrite(b"y" * 513, 512))
    expect_errno("oversized read (33 MiB)", errno.EINVAL, lambda: h.pread(33 << 20, 0))
    expect_errno("oversized write (33 MiB)", errno.EINVAL, lambda: h.pwrite(b"z" * (33 << 20), 0))
    # A refused write's payload was consumed: the connection is still in sync.
    assert h.pread(4096, 0) == b"\x5a" * 4096, "connection out of sync after refused writes"
    print("ok   connection still in sync after refused writes")

    ro = connect(ro_uri)
    assert ro.is_read_only()
    expect_errno("write to read-only export", errno.EPERM, lambda: ro.pwrite(b"w" * 4096, 0))
    expect_errno("trim on read-only export", errno.EPERM, lambda: ro.trim(4096, 0))
    expect_errno("zero on read-only export", errno.EPERM, lambda: ro.zero(4096, 0))
    assert len(ro.pread(4096, 0)) == 4096
    ro.shutdown()
    h.shutdown()
    print("all error cases gave the expected errno")


if __name__ == "__main__":
    main()
