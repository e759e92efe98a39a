//! One mapping from I/O errors to NBD error values, aware of the request's flags (as nbdkit's
//! `nbd_errno`): `ENOTSUP` only answers a request that allowed it (`FAST_ZERO`), `EOVERFLOW`
//! only one that asked for a single chunk (`DF`); other requests get `EINVAL` for those.

use std::io;

use nbd_proto::consts::*;

/// The NBD error value for `e`, answering a request with `flags`.
pub fn errno_of(e: &io::Error, flags: u16) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NBD_EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NBD_ENOSPC,
        Some(libc::ENOMEM) => NBD_ENOMEM,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::ESHUTDOWN) => NBD_ESHUTDOWN,
        Some(libc::EOVERFLOW) if flags & NBD_CMD_FLAG_DF != 0 => NBD_EOVERFLOW,
        Some(libc::EOVERFLOW) => NBD_EINVAL,
        Some(libc::ENOTSUP) if flags & NBD_CMD_FLAG_FAST_ZERO != 0 => NBD_ENOTSUP,
        Some(libc::ENOTSUP) => NBD_EINVAL,
        Some(_) => NBD_EIO,
        // Errors made by the layers above the kernel carry only a kind.
        None if e.kind() == io::ErrorKind::PermissionDenied => NBD_EPERM,
        None if e.kind() == io::ErrorKind::Unsupported && flags & NBD_CMD_FLAG_FAST_ZERO != 0 => NBD_ENOTSUP,
        None => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    #[test]
    fn flag_aware_values() {
        assert_eq!(errno_of(&os(libc::ENOTSUP), NBD_CMD_FLAG_FAST_ZERO), NBD_ENOTSUP);
        assert_eq!(errno_of(&os(libc::ENOTSUP), 0), NBD_EINVAL);
        assert_eq!(errno_of(&os(libc::EOVERFLOW), NBD_CMD_FLAG_DF), NBD_EOVERFLOW);
        assert_eq!(errno_of(&os(libc::EOVERFLOW), 0), NBD_EINVAL);
    }

    #[test]
    fn plain_values() {
        for (e, want) in [
            (libc::EPERM, NBD_EPERM),
            (libc::EROFS, NBD_EPERM),
            (libc::ENOSPC, NBD_ENOSPC),
            (libc::EDQUOT, NBD_ENOSPC),
            (libc::ENOMEM, NBD_ENOMEM),
            (libc::EIO, NBD_EIO),
            (libc::ENXIO, NBD_EIO),
            (libc::ESHUTDOWN, NBD_ESHUTDOWN),
        ] {
            assert_eq!(errno_of(&os(e), 0), want, "errno {e}");
        }
        assert_eq!(errno_of(&io::Error::new(io::ErrorKind::PermissionDenied, "fenced"), 0), NBD_EPERM);
        assert_eq!(errno_of(&io::Error::other("a sync failed"), 0), NBD_EIO);
    }
}
