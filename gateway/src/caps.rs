//! Capabilities from the binary's file capabilities.
//!
//! The container image gives `/egress-gateway` the file capabilities `cap_net_admin,cap_net_raw=p`
//! (permitted, not effective), so that the image's non-root user gets them without running as root. Being
//! permitted only (no effective bit), the kernel lets the binary start even where a container's bounding set
//! lacks one of them (the node agent needs NET_ADMIN only), and gives it what the bounding set allows; the
//! binary then makes its permitted capabilities effective itself, here, before it opens any socket.
//! Processes started as root, or with ambient capabilities, are unaffected (their effective set already
//! holds what they have).

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit words.
const VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Makes every permitted capability effective. Returns the effective set afterwards (bit n = capability
/// n), or the error of `capget`/`capset`.
pub(crate) fn raise_permitted() -> std::io::Result<u64> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version-3 header writes two `Data` structs (repr(C), the kernel's
    // `__user_cap_data_struct`: three u32, any bit pattern valid), which `data` holds; both pointers are live
    // mutable locals.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = data;
    for d in &mut data {
        d.effective |= d.permitted;
    }
    if before[0].effective != data[0].effective || before[1].effective != data[1].effective {
        // SAFETY: capset reads the version-3 header and two `Data` structs (repr(C), the kernel's
        // `__user_cap_data_struct`) through the pointers passed, both live locals; it writes nothing but the
        // header's version field on a version mismatch, which `header` (a mutable local) allows.
        let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_keeps_the_effective_set_within_the_permitted_one() {
        let eff = raise_permitted().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |k: &str| {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim();
            u64::from_str_radix(v, 16).unwrap()
        };
        assert_eq!(eff, field("CapEff:"));
        assert_eq!(eff & !field("CapPrm:"), 0);
    }
}
