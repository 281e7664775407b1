//! The sysctls the node needs, written through `/proc/sys`: the one part of the agent's kernel state that is
//! not netlink.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::link::check_name;
use super::KernelError;

/// [`super::set_sysctls`] under `root` (`/proc/sys`, or a directory in tests).
pub(super) fn set_sysctls_in(root: &Path, device: &str) -> Result<(), KernelError> {
    check_name(device)?;
    set(&root.join("net/ipv4/fib_multipath_hash_policy"), "1")?;
    let v6 = root.join("net/ipv6/fib_multipath_hash_policy");
    if root.join("net/ipv6").exists() {
        set(&v6, "1")?;
    } else {
        tracing::info!(path = %v6.display(), "no IPv6 on this node; not setting it");
    }
    set(
        &root.join("net/ipv4/conf").join(device).join("rp_filter"),
        "0",
    )
}

/// Writes `value` to `path` unless it already holds it.
fn set(path: &Path, value: &str) -> Result<(), KernelError> {
    let error = |verb, source: io::Error| KernelError::Sysctl {
        verb,
        path: PathBuf::from(path),
        source,
    };
    let current = fs::read_to_string(path).map_err(|e| error("read", e))?;
    if current.trim() == value {
        return Ok(());
    }
    tracing::info!(path = %path.display(), from = current.trim(), to = value, "setting sysctl");
    fs::write(path, format!("{value}\n")).map_err(|e| error("write", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `/proc/sys` look-alike in a fresh temporary directory.
    fn fake_root(name: &str, ipv6: bool) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("egress-sysctl-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("net/ipv4/conf/egress.calico")).unwrap();
        fs::write(root.join("net/ipv4/fib_multipath_hash_policy"), "0\n").unwrap();
        fs::write(root.join("net/ipv4/conf/egress.calico/rp_filter"), "2\n").unwrap();
        if ipv6 {
            fs::create_dir_all(root.join("net/ipv6")).unwrap();
            fs::write(root.join("net/ipv6/fib_multipath_hash_policy"), "0\n").unwrap();
        }
        root
    }

    fn read(root: &Path, key: &str) -> String {
        fs::read_to_string(root.join(key))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn writes_the_three_values_by_the_device_s_real_name() {
        let root = fake_root("all", true);
        set_sysctls_in(&root, "egress.calico").unwrap();
        assert_eq!(read(&root, "net/ipv4/fib_multipath_hash_policy"), "1");
        assert_eq!(read(&root, "net/ipv6/fib_multipath_hash_policy"), "1");
        assert_eq!(read(&root, "net/ipv4/conf/egress.calico/rp_filter"), "0");
        // Again: nothing to write.
        set_sysctls_in(&root, "egress.calico").unwrap();
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_ipv6_is_skipped_and_errors_name_the_file() {
        let root = fake_root("nov6", false);
        set_sysctls_in(&root, "egress.calico").unwrap();
        let e = set_sysctls_in(&root, "missing0").unwrap_err();
        let expected = format!(
            "read {}: No such file or directory (os error 2)",
            root.join("net/ipv4/conf/missing0/rp_filter").display()
        );
        assert_eq!(e.to_string(), expected);
        let e = set_sysctls_in(&root, "../../x").unwrap_err();
        assert!(e.to_string().starts_with("invalid device name"), "{e}");
        fs::remove_dir_all(&root).unwrap();
    }
}
