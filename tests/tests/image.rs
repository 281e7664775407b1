//! The container image's binary, run as the image runs it (docs/deploy.md): from the image's exported filesystem
//! (`scripts/image.sh --export-dir DIR`), as its non-root user 65532 with only CAP_NET_ADMIN and
//! CAP_NET_RAW, as the gateway of the standard topology — and traffic passes.
//!
//! `EGRESS_IMAGE_ROOT=DIR` names the exported tree. Without it the test says SKIPPED, unless
//! `EGRESS_REQUIRE_IMAGE=1` (set by `scripts/test.sh`, which exports the image first) makes that a failure.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use tests::topology::RED_SERVER;
use tests::{require_netns, traffic, GatewayMode, Topology};

/// The capabilities the image's user gets: CAP_NET_ADMIN (12) and CAP_NET_RAW (13).
const CAPS: u64 = (1 << 12) | (1 << 13);
const UID: u32 = 65532;

fn image_root() -> Option<PathBuf> {
    match std::env::var_os("EGRESS_IMAGE_ROOT") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var("EGRESS_REQUIRE_IMAGE").as_deref() == Ok("1") => {
            panic!("EGRESS_REQUIRE_IMAGE=1 but EGRESS_IMAGE_ROOT is not set (scripts/image.sh --export-dir DIR)")
        }
        None => None,
    }
}

/// A field of /proc/<pid>/status.
fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

#[test]
fn the_image_runs_as_its_user_with_two_capabilities_and_forwards() {
    require_netns!();
    let Some(root) = image_root() else {
        println!("SKIPPED the_image_runs_as_its_user_with_two_capabilities_and_forwards: EGRESS_IMAGE_ROOT is not set");
        return;
    };
    let binary = root.join("egress-gateway");
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&version.stdout).starts_with("egress-gateway "),
        "{version:?}"
    );

    // The gateway's command as a container runtime starts it for the pod of deploy/gateway/statefulset.yaml:
    // the image's user, a bounding set of the two capabilities, nothing permitted, effective or ambient, and
    // no no-new-privs (allowPrivilegeEscalation: true) — so that what the process holds comes from the
    // binary's file capabilities (cap_net_admin,cap_net_raw=p), made effective by the binary itself.
    let dir = std::env::temp_dir().join(format!("egress-image-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("egress-gateway-as-image-user");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --reuid={UID} --regid={UID} --clear-groups \
             --inh-caps=-all --ambient-caps=-all --bounding-set=-all,+net_admin,+net_raw {} \"$@\"\n",
            binary.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut topo = Topology::standard(GatewayMode::Userspace {
        binary: wrapper.clone(),
    })
    .unwrap();
    let ready = topo.gateway_mut(1).wait_ready(Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
    ready.unwrap();
    let gw = topo.gateway(1);
    let pid = gw.process().expect("the gateway runs").pid();
    assert_eq!(
        status_field(pid, "Uid:").split_whitespace().next(),
        Some(UID.to_string().as_str())
    );
    let eff = u64::from_str_radix(&status_field(pid, "CapEff:"), 16).unwrap();
    assert_eq!(
        eff, CAPS,
        "effective capabilities {eff:#x}, want exactly NET_ADMIN+NET_RAW"
    );

    let addr = SocketAddr::from((RED_SERVER, 7950));
    let server = traffic::tcp_echo_server(&topo.red().ns, addr).unwrap();
    let pod = topo.pod(1, 1);
    assert_eq!(
        traffic::tcp_echo(&pod.ns, addr, b"from the image").unwrap(),
        b"from the image"
    );
    assert_eq!(
        server.last_peer().map(|p| p.ip()),
        Some(IpAddr::V4(gw.dmz_egress))
    );
    traffic::ping(&pod.ns, IpAddr::V4(RED_SERVER), 2).unwrap();
}
