//! Tests against the real kernel. Each runs on a thread of its own that moves into a fresh network namespace
//! (`unshare(CLONE_NEWNET)` affects only the calling thread), with a current-thread tokio runtime built
//! there, so the rtnetlink socket — and every `ip` or `bridge` the test runs to check the result, since a
//! child process starts in the namespace of the thread that spawned it — lives in that namespace. When the
//! thread ends the namespace goes, with every device in it: nothing is left behind, also on failure.
//!
//! Without the privilege to make a namespace (not root), a test prints `SKIPPED` and the reason and passes;
//! with `EGRESS_REQUIRE_NETNS=1` it fails instead.

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::RouteAttribute;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{LinkUnspec, LinkVeth};

use super::{route, Kernel, KernelError, Mode};
use crate::node::state::{
    link_local, tunnel_mac, ApplyReport, Desired, Mac, Ownership, RouteKind, RuleSpec, VxlanSpec,
};

const DEVICE: &str = "egress.calico";
const UNDERLAY: &str = "u0";
const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);

/// Runs `body` in a fresh network namespace (see the module documentation).
fn in_netns<F, Fut>(test: &'static str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if let Err(e) = Command::new("ip").arg("-V").output() {
        return skip(test, &format!("cannot run `ip`: {e}"));
    }
    let outcome = std::thread::spawn(move || -> Result<(), String> {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread into a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                return Err(format!("unshare(CLONE_NEWNET): {e} (not root?)"));
            }
            panic!("unshare(CLONE_NEWNET): {e}");
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        runtime.block_on(body());
        Ok(())
    })
    .join();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => skip(test, &reason),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn skip(test: &str, reason: &str) {
    if std::env::var("EGRESS_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: EGRESS_REQUIRE_NETNS=1 but the test cannot run: {reason}");
    }
    println!("SKIPPED {test}: {reason}");
}

/// Runs a command in the test's namespace; returns its output, one line per `-o` record, white space
/// collapsed and the `\` that `-o` puts between next hops dropped.
fn run(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let output = Command::new(words[0])
        .args(&words[1..])
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(
        output.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            line.split_whitespace()
                .filter(|word| *word != "\\")
                .map(|word| word.trim_end_matches('\\'))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Like [`run`], for a command expected to fail; returns its error output.
fn run_failing(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().collect();
    let output = Command::new(words[0])
        .args(&words[1..])
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(!output.status.success(), "{command} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `lo` up, and the underlay: veth `u0` (10.9.0.1/24, up) with its peer `u1` (up). Made through rtnetlink.
async fn underlay() {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    let index = |name: &'static str| {
        let handle = handle.clone();
        async move {
            handle
                .link()
                .get()
                .match_name(name)
                .execute()
                .try_next()
                .await
                .unwrap()
                .unwrap()
                .header
                .index
        }
    };
    let up = |index: u32| {
        handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
    };
    up(index("lo").await).execute().await.unwrap();
    handle
        .link()
        .add(LinkVeth::new(UNDERLAY, "u1").build())
        .execute()
        .await
        .unwrap();
    let u0 = index(UNDERLAY).await;
    handle
        .address()
        .add(u0, IpAddr::V4(LOCAL), 24)
        .execute()
        .await
        .unwrap();
    up(u0).execute().await.unwrap();
    up(index("u1").await).execute().await.unwrap();
    // The check that `ip` runs in this namespace: it sees exactly these three devices.
    let links = run("ip -o link show");
    assert_eq!(
        links.lines().count(),
        3,
        "not in the test's namespace:\n{links}"
    );
}

fn spec() -> VxlanSpec {
    VxlanSpec {
        device: DEVICE.into(),
        vni: 4097,
        port: 4790,
        mtu: 1450,
        local: LOCAL,
        underlay_device: UNDERLAY.into(),
    }
}

fn owned() -> Ownership {
    Ownership {
        device: DEVICE.into(),
        rule_priority: 100,
        tables: 300..=399,
        nexthops: crate::node::state::NEXTHOP_IDS,
    }
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn gw1() -> Ipv4Addr {
    v4("10.244.1.5")
}

fn gw2() -> Ipv4Addr {
    v4("10.244.2.9")
}

fn ll(gateway: Ipv4Addr) -> IpAddr {
    IpAddr::V6(link_local(tunnel_mac(gateway)))
}

fn rule(src: &str, table: u32) -> RuleSpec {
    RuleSpec {
        src: src.parse().unwrap(),
        table,
        priority: 100,
    }
}

/// Neighbours and FDB entries for `gateways`.
fn add_gateways(desired: &mut Desired, gateways: &[Ipv4Addr]) {
    for &gateway in gateways {
        let mac: Mac = tunnel_mac(gateway);
        desired.neighbours.insert(IpAddr::V4(gateway), mac);
        desired.neighbours.insert(ll(gateway), mac);
        desired.fdb.insert(mac, gateway);
    }
}

/// Every kind of route, both families, rules, neighbours, FDB.
fn desired_first() -> Desired {
    let mut d = Desired::default();
    for r in [
        rule("10.0.1.1", 300),
        rule("10.0.1.2", 301),
        rule("10.0.1.3", 303),
        rule("fd00::1:1", 302),
    ] {
        d.rules.insert(r);
    }
    let both = vec![IpAddr::V4(gw1()), IpAddr::V4(gw2())];
    let routes = [
        ((300, "0.0.0.0/0"), RouteKind::Via(vec![IpAddr::V4(gw1())])),
        ((300, "10.0.0.0/8"), RouteKind::Throw),
        ((300, "203.0.113.0/24"), RouteKind::Unreachable),
        ((301, "0.0.0.0/0"), RouteKind::Via(both.clone())),
        ((303, "0.0.0.0/0"), RouteKind::Via(both)),
        ((302, "::/0"), RouteKind::Via(vec![ll(gw1())])),
        (
            (302, "2001:db8::/32"),
            RouteKind::Via(vec![ll(gw1()), ll(gw2())]),
        ),
        ((302, "fd00::/8"), RouteKind::Throw),
        ((302, "2001:db8:dead::/48"), RouteKind::Unreachable),
    ];
    for ((table, dst), kind) in routes {
        d.routes.insert((table, net(dst)), kind);
    }
    add_gateways(&mut d, &[gw1(), gw2()]);
    d
}

/// [`desired_first`] after gw1 went away and one pod left: a multipath set loses a gateway (IPv4 and
/// IPv6), single-gateway routes turn unreachable, one rule and its table go, and gw1's neighbours and
/// FDB entry with them.
fn desired_second() -> Desired {
    let mut d = desired_first();
    d.rules.remove(&rule("10.0.1.2", 301));
    d.routes.remove(&(301, net("0.0.0.0/0")));
    d.routes
        .insert((300, net("0.0.0.0/0")), RouteKind::Unreachable);
    d.routes.insert(
        (303, net("0.0.0.0/0")),
        RouteKind::Via(vec![IpAddr::V4(gw2())]),
    );
    d.routes.insert((302, net("::/0")), RouteKind::Unreachable);
    d.routes
        .insert((302, net("2001:db8::/32")), RouteKind::Via(vec![ll(gw2())]));
    d.neighbours.clear();
    d.fdb.clear();
    add_gateways(&mut d, &[gw2()]);
    d
}

/// What the agent's objects look like through `ip` and `bridge`, sorted, plus the foreign ones that share
/// their filters (the table-500 route and rule).
fn kernel_state() -> Vec<String> {
    let mut lines: Vec<String> = [
        "ip -o -4 rule show priority 100",
        "ip -o -6 rule show priority 100",
        "ip -o -4 route show table all proto 242",
        "ip -o -6 route show table all proto 242",
        "ip -o -4 neigh show dev egress.calico nud permanent",
        "ip -o -6 neigh show dev egress.calico nud permanent",
        "bridge fdb show dev egress.calico",
    ]
    .iter()
    .flat_map(|command| run(command).lines().map(str::to_owned).collect::<Vec<_>>())
    .collect();
    lines.sort();
    lines
}

fn expect(lines: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    lines.sort();
    lines
}

/// Objects in the namespace that are not the agent's: proto static in an owned table, a rule at another
/// priority, a proto 242 route and rule in a table outside the range, a permanent neighbour elsewhere.
fn add_foreign_objects() {
    for command in [
        "ip route add table 300 192.0.2.0/24 dev u0 proto static",
        "ip rule add from 10.0.9.9 lookup 300 priority 200 proto 242",
        "ip route add table 500 198.51.100.0/24 dev u0 proto 242",
        "ip rule add from 10.0.9.8 lookup 500 priority 100 proto 242",
        "ip neigh add 10.9.0.2 lladdr 02:00:00:00:00:02 dev u0 nud permanent",
    ] {
        run(command);
    }
}

fn foreign_objects() -> String {
    [
        "ip -o route show table 300 proto static",
        "ip -o rule show priority 200",
        "ip -o route show table 500",
        "ip -o rule show lookup 500",
        "ip -o neigh show dev u0 nud permanent",
    ]
    .iter()
    .map(|command| run(command))
    .collect::<Vec<_>>()
    .join("\n")
}

const FOREIGN: &str = "192.0.2.0/24 dev u0 scope link\n\
     200: from 10.0.9.9 lookup 300 proto 242\n\
     198.51.100.0/24 dev u0 proto 242 scope link\n\
     100: from 10.0.9.8 lookup 500 proto 242\n\
     10.9.0.2 lladdr 02:00:00:00:00:02 PERMANENT";

/// What [`desired_first`] looks like (`ip` omits `proto 242` when it is the filter).
const FIRST: &[&str] = &[
    "100: from 10.0.1.1 lookup 300 proto 242",
    "100: from 10.0.1.2 lookup 301 proto 242",
    "100: from 10.0.1.3 lookup 303 proto 242",
    "100: from 10.0.9.8 lookup 500 proto 242",
    "100: from fd00::1:1 lookup 302 proto 242",
    "default via 10.244.1.5 dev egress.calico table 300 onlink",
    "throw 10.0.0.0/8 table 300",
    "unreachable 203.0.113.0/24 table 300",
    "default table 301 nexthop via 10.244.1.5 dev egress.calico weight 1 onlink nexthop via 10.244.2.9 dev egress.calico weight 1 onlink",
    "default table 303 nexthop via 10.244.1.5 dev egress.calico weight 1 onlink nexthop via 10.244.2.9 dev egress.calico weight 1 onlink",
    "198.51.100.0/24 dev u0 table 500 scope link",
    "default via fe80::a02a:aff:fef4:105 dev egress.calico table 302 metric 1024 pref medium",
    "2001:db8::/32 table 302 metric 1024 pref medium nexthop via fe80::a02a:aff:fef4:105 dev egress.calico weight 1 nexthop via fe80::a02a:aff:fef4:209 dev egress.calico weight 1",
    "throw fd00::/8 dev lo table 302 metric 1024 pref medium",
    "unreachable 2001:db8:dead::/48 dev lo table 302 metric 1024 pref medium",
    "10.244.1.5 lladdr a2:2a:0a:f4:01:05 PERMANENT",
    "10.244.2.9 lladdr a2:2a:0a:f4:02:09 PERMANENT",
    "fe80::a02a:aff:fef4:105 lladdr a2:2a:0a:f4:01:05 PERMANENT",
    "fe80::a02a:aff:fef4:209 lladdr a2:2a:0a:f4:02:09 PERMANENT",
    "a2:2a:0a:f4:01:05 dst 10.244.1.5 self permanent",
    "a2:2a:0a:f4:02:09 dst 10.244.2.9 self permanent",
];

/// What [`desired_second`] looks like.
const SECOND: &[&str] = &[
    "100: from 10.0.1.1 lookup 300 proto 242",
    "100: from 10.0.1.3 lookup 303 proto 242",
    "100: from 10.0.9.8 lookup 500 proto 242",
    "100: from fd00::1:1 lookup 302 proto 242",
    "unreachable default table 300",
    "throw 10.0.0.0/8 table 300",
    "unreachable 203.0.113.0/24 table 300",
    "default via 10.244.2.9 dev egress.calico table 303 onlink",
    "198.51.100.0/24 dev u0 table 500 scope link",
    "unreachable default dev lo table 302 metric 1024 pref medium",
    "2001:db8::/32 via fe80::a02a:aff:fef4:209 dev egress.calico table 302 metric 1024 pref medium",
    "throw fd00::/8 dev lo table 302 metric 1024 pref medium",
    "unreachable 2001:db8:dead::/48 dev lo table 302 metric 1024 pref medium",
    "10.244.2.9 lladdr a2:2a:0a:f4:02:09 PERMANENT",
    "fe80::a02a:aff:fef4:209 lladdr a2:2a:0a:f4:02:09 PERMANENT",
    "a2:2a:0a:f4:02:09 dst 10.244.2.9 self permanent",
];

fn report(added: usize, replaced: usize, removed: usize) -> ApplyReport {
    ApplyReport {
        added,
        replaced,
        removed,
    }
}

#[test]
fn ensure_vxlan_creates_fixes_recreates_and_refuses_a_foreign_device() {
    in_netns("ensure_vxlan", || async {
        underlay().await;
        let kernel = Kernel::connect().unwrap();
        let index = kernel.ensure_vxlan(&spec()).await.unwrap();
        let link = run("ip -d link show egress.calico");
        for part in [
            &format!("{index}: egress.calico: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450"),
            "vxlan id 4097 local 10.9.0.1 dev u0 srcport 0 0 dstport 4790 nolearning",
            "alias egress-gateway node agent",
        ] {
            assert!(link.contains(part), "{part:?} not in\n{link}");
        }
        // Again: the same device.
        assert_eq!(kernel.ensure_vxlan(&spec()).await.unwrap(), index);

        // MTU and down are fixed in place.
        run("ip link set egress.calico mtu 1400 down");
        assert_eq!(kernel.ensure_vxlan(&spec()).await.unwrap(), index);
        let link = run("ip link show egress.calico");
        assert!(link.contains("UP,LOWER_UP> mtu 1450"), "{link}");

        // Another VNI: made again.
        let other = VxlanSpec {
            vni: 4098,
            ..spec()
        };
        let index2 = kernel.ensure_vxlan(&other).await.unwrap();
        assert_ne!(index2, index);
        let link = run("ip -d link show egress.calico");
        assert!(
            link.contains("vxlan id 4098 local 10.9.0.1 dev u0"),
            "{link}"
        );
        assert!(link.contains("alias egress-gateway node agent"), "{link}");

        // A device the agent did not make is refused and left alone, by ensure_vxlan and by cleanup.
        run("ip link add foreign0 type vxlan id 5 dstport 4789 local 10.9.0.1 dev u0");
        let before = run("ip -d link show foreign0");
        let foreign = VxlanSpec {
            device: "foreign0".into(),
            ..spec()
        };
        let e = kernel.ensure_vxlan(&foreign).await.unwrap_err();
        assert!(matches!(e, KernelError::ForeignDevice { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "device foreign0 exists but was not created by the node agent (its alias is \"\", not \
             \"egress-gateway node agent\"); it will not be touched: remove it, or configure another \
             device name"
        );
        let cleanup = kernel
            .cleanup(&Ownership {
                device: "foreign0".into(),
                ..owned()
            })
            .await
            .unwrap();
        assert_eq!(cleanup, ApplyReport::default());
        assert_eq!(run("ip -d link show foreign0"), before);

        // A missing underlay is named.
        let e = kernel
            .ensure_vxlan(&VxlanSpec {
                underlay_device: "nope0".into(),
                ..spec()
            })
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "device nope0 not found");

        // The sysctls, in this namespace (checked: /proc/sys/net shows this namespace's devices).
        assert!(std::path::Path::new("/proc/sys/net/ipv4/conf/u0").exists());
        super::set_sysctls(DEVICE).unwrap();
        let read = |key: &str| std::fs::read_to_string(format!("/proc/sys/net/{key}")).unwrap();
        assert_eq!(read("ipv4/fib_multipath_hash_policy").trim(), "1");
        assert_eq!(read("ipv6/fib_multipath_hash_policy").trim(), "1");
        assert_eq!(read("ipv4/conf/egress.calico/rp_filter").trim(), "0");
    });
}

/// The multipath path (kernels without resilient nexthop groups).
#[test]
fn apply_reconciles_and_cleanup_removes_only_what_the_agent_owns() {
    in_netns("apply_and_cleanup", || async {
        underlay().await;
        add_foreign_objects();
        assert_eq!(foreign_objects(), FOREIGN);
        let kernel = Kernel::connect().unwrap();
        kernel.force_mode(Mode::Multipath);
        let index = kernel.ensure_vxlan(&spec()).await.unwrap();

        // 4 rules, 9 routes, 4 neighbours, 2 FDB entries.
        let first = desired_first();
        let done = kernel.apply(index, &first, &owned()).await.unwrap();
        assert_eq!(done, report(19, 0, 0));
        assert_eq!(kernel_state(), expect(FIRST));
        assert_eq!(foreign_objects(), FOREIGN);

        // The kernel reports the IPv6 multipath route as one message with RTA_MULTIPATH.
        let v6 = kernel
            .dump(route::dump_request(AddressFamily::Inet6), "dump")
            .await
            .unwrap();
        let multipath = v6.iter().any(|m| {
            matches!(m, RouteNetlinkMessage::NewRoute(r)
                if r.header.destination_prefix_length == 32
                    && r.attributes.iter().any(|a| matches!(a, RouteAttribute::MultiPath(h) if h.len() == 2)))
        });
        assert!(
            multipath,
            "IPv6 multipath is not reported as RTA_MULTIPATH: {v6:?}"
        );

        // Again: nothing to do.
        assert_eq!(
            kernel.apply(index, &first, &owned()).await.unwrap(),
            ApplyReport::default()
        );

        // gw1 gone, one pod gone: replaced = 300 default, 303 default, 302 ::/0, 302 2001:db8::/32;
        // removed = rule 301, route 301 default, gw1's two neighbours and FDB entry.
        let second = desired_second();
        let done = kernel.apply(index, &second, &owned()).await.unwrap();
        assert_eq!(done, report(0, 4, 5));
        assert_eq!(kernel_state(), expect(SECOND));
        assert_eq!(foreign_objects(), FOREIGN);
        assert_eq!(
            kernel.apply(index, &second, &owned()).await.unwrap(),
            ApplyReport::default()
        );

        // And back: unreachable → via, single → multipath, the rule and table return.
        let done = kernel.apply(index, &first, &owned()).await.unwrap();
        assert_eq!(done, report(2 + 3, 4, 0));
        assert_eq!(kernel_state(), expect(FIRST));

        // Drift made by someone else is repaired; their objects stay.
        run("ip route del table 300 10.0.0.0/8 proto 242");
        run("ip neigh replace 10.244.2.9 lladdr 02:00:00:00:00:09 dev egress.calico nud permanent");
        run("ip route add table 399 unreachable 198.18.0.0/15 proto 242");
        run("bridge fdb append 00:00:00:00:00:00 dev egress.calico dst 10.9.0.99");
        run("ip -6 route add table 302 unreachable 2001:db8:dead::/48 proto 242 metric 5");
        let done = kernel.apply(index, &first, &owned()).await.unwrap();
        assert_eq!(done, report(1, 1, 3));
        assert_eq!(kernel_state(), expect(FIRST));

        // Cleanup: 4 rules + 9 routes + 4 neighbours + 2 FDB entries + the device.
        let done = kernel.cleanup(&owned()).await.unwrap();
        assert_eq!(done, report(0, 0, 20));
        assert_eq!(
            kernel_state_without_device(),
            expect(&[
                "100: from 10.0.9.8 lookup 500 proto 242",
                "198.51.100.0/24 dev u0 table 500 scope link",
            ])
        );
        assert!(run_failing("ip link show egress.calico").contains("does not exist"));
        assert_eq!(foreign_objects(), FOREIGN);
        // Again: nothing left.
        assert_eq!(
            kernel.cleanup(&owned()).await.unwrap(),
            ApplyReport::default()
        );
    });
}

/// [`kernel_state`] once the device is gone.
fn kernel_state_without_device() -> Vec<String> {
    let mut lines: Vec<String> = [
        "ip -o -4 rule show priority 100",
        "ip -o -6 rule show priority 100",
        "ip -o -4 route show table all proto 242",
        "ip -o -6 route show table all proto 242",
    ]
    .iter()
    .flat_map(|command| run(command).lines().map(str::to_owned).collect::<Vec<_>>())
    .collect();
    lines.sort();
    lines
}

#[test]
fn a_failed_route_keeps_its_pod_s_rule_out() {
    in_netns("failed_route", || async {
        underlay().await;
        let kernel = Kernel::connect().unwrap();
        let index = kernel.ensure_vxlan(&spec()).await.unwrap();
        // Someone else's route at the agent's key: the add fails with EEXIST.
        run("ip route add table 310 10.0.0.0/8 dev u0 proto static");
        let mut desired = Desired::default();
        desired.rules.insert(rule("10.0.1.1", 310));
        desired.rules.insert(rule("10.0.1.2", 311));
        desired
            .routes
            .insert((310, net("10.0.0.0/8")), RouteKind::Throw);
        desired
            .routes
            .insert((311, net("10.0.0.0/8")), RouteKind::Throw);
        let e = kernel.apply(index, &desired, &owned()).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "2 of 4 kernel changes failed (2 added, 0 replaced, 0 removed went through); first: add \
             route 10.0.0.0/8 table 310: File exists (os error 17)"
        );
        assert_eq!(
            run("ip -o rule show priority 100"),
            "100: from 10.0.1.2 lookup 311 proto 242"
        );
    });
}

/// Builds a node with `pods` pods (a rule and three routes each, two gateways) in tables from 1000.
fn desired_at_scale(pods: u32, flip: bool) -> Desired {
    let mut d = Desired::default();
    let both = vec![IpAddr::V4(gw1()), IpAddr::V4(gw2())];
    for pod in 0..pods {
        let table = 1000 + pod;
        let src = Ipv4Addr::from(u32::from(v4("10.1.0.0")) + pod);
        d.rules.insert(RuleSpec {
            src: IpAddr::V4(src),
            table,
            priority: 100,
        });
        let via = if flip && pod == pods / 2 {
            RouteKind::Via(vec![IpAddr::V4(gw2())])
        } else {
            RouteKind::Via(both.clone())
        };
        d.routes.insert((table, net("0.0.0.0/0")), via);
        d.routes
            .insert((table, net("10.0.0.0/8")), RouteKind::Throw);
        d.routes.insert(
            (table, net("::/0")),
            RouteKind::Via(vec![ll(gw1()), ll(gw2())]),
        );
    }
    add_gateways(&mut d, &[gw1(), gw2()]);
    d
}

/// With multipath routes a failover replaces one route per pod table; here one pod's route flips.
#[test]
fn apply_time_of_a_failover() {
    in_netns("apply_time", || async {
        underlay().await;
        let kernel = Kernel::connect().unwrap();
        kernel.force_mode(Mode::Multipath);
        let mut index = kernel.ensure_vxlan(&spec()).await.unwrap();
        let owned = Ownership {
            tables: 1000..=1999,
            ..owned()
        };
        for pods in [3, 300] {
            let steady = desired_at_scale(pods, false);
            let flipped = desired_at_scale(pods, true);
            let began = Instant::now();
            kernel.apply(index, &steady, &owned).await.unwrap();
            let first = began.elapsed();
            let began = Instant::now();
            let idle = kernel.apply(index, &steady, &owned).await.unwrap();
            let noop = began.elapsed();
            assert_eq!(idle, ApplyReport::default());
            let mut flips = Vec::new();
            for i in 0..20 {
                let target = if i % 2 == 0 { &flipped } else { &steady };
                let began = Instant::now();
                let done = kernel.apply(index, target, &owned).await.unwrap();
                flips.push(began.elapsed());
                assert_eq!(done, report(0, 1, 0));
            }
            flips.sort();
            let mean = flips.iter().sum::<Duration>() / u32::try_from(flips.len()).unwrap();
            println!(
                "apply with {pods} pods ({} rules, {} routes): first {first:?}, unchanged {noop:?}; \
                 flipping one multipath route: mean {mean:?}, min {:?}, max {:?}",
                steady.rules.len(),
                steady.routes.len(),
                flips[0],
                flips[flips.len() - 1]
            );
            kernel.cleanup(&owned).await.unwrap();
            index = kernel.ensure_vxlan(&spec()).await.unwrap();
        }
    });
}

/// The agent's nexthops (`ip -o nexthop show proto 242`), their ids shown relative to the range's start
/// (`#0`, `#1`, ...) so that the expectations read.
fn nexthop_state() -> Vec<String> {
    let base = *crate::node::state::NEXTHOP_IDS.start();
    let relative = |word: &str| -> String {
        word.split('/')
            .map(|id| match id.parse::<u32>() {
                Ok(id) if id >= base => format!("#{}", id - base),
                _ => id.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let mut lines: Vec<String> = run("ip -o nexthop show proto 242")
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            words
                .iter()
                .enumerate()
                .map(|(i, w)| match i.checked_sub(1).map(|p| words[p]) {
                    Some("id" | "group") => relative(w),
                    _ => (*w).to_owned(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    lines.sort();
    lines
}

/// The group id a route uses (`nhid N` of `ip -o route show table T DST`).
fn nhid(family: &str, table: u32, dst: &str) -> Option<u32> {
    let line = run(&format!("ip -o {family} route show table {table} {dst}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "nhid")?;
    words.get(at + 1)?.parse().ok()
}

/// The default: resilient nexthop groups. Members and groups are made before the routes that use them;
/// when a gateway goes, each group it was in is replaced in place (the routes on it are not touched); a
/// restarted agent adopts what is there; cleanup removes the nexthops too.
#[test]
fn resilient_groups_are_replaced_in_place_adopted_and_cleaned_up() {
    in_netns("resilient_groups", || async {
        underlay().await;
        add_foreign_objects();
        // Someone else's nexthops: one outside the range, one inside with another protocol.
        run("ip nexthop add id 7 via 10.9.0.7 dev u0 proto static");
        let foreign_in_range = crate::node::state::NEXTHOP_IDS.start() + 1;
        run(&format!(
            "ip nexthop add id {foreign_in_range} via 10.9.0.8 dev u0 proto static"
        ));
        let kernel = Kernel::connect().unwrap();
        let index = kernel.ensure_vxlan(&spec()).await.unwrap();

        // 4 rules, 9 routes, 4 neighbours, 2 FDB entries; 4 groups ({gw1}, {gw1,gw2} for each family,
        // numbered first) and 4 members (two gateways, two families).
        let first = desired_first();
        let done = kernel.apply(index, &first, &owned()).await.unwrap();
        assert_eq!(kernel.current_mode(), Some(Mode::Resilient));
        assert_eq!(done, report(19 + 8, 0, 0));
        let groups = nexthop_state();
        assert_eq!(
            groups,
            expect(&[
                "id #0 group #5 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #2 group #5/#6 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #3 group #7 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #4 group #7/#8 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #5 via 10.244.1.5 dev egress.calico scope link proto 242 onlink",
                "id #6 via 10.244.2.9 dev egress.calico scope link proto 242 onlink",
                "id #7 via fe80::a02a:aff:fef4:105 dev egress.calico scope link proto 242",
                "id #8 via fe80::a02a:aff:fef4:209 dev egress.calico scope link proto 242",
            ]),
            "id #1 is someone else's"
        );
        let shared_v4 = nhid("-4", 301, "default").unwrap();
        assert_eq!(nhid("-4", 303, "default"), Some(shared_v4));
        let shared_v6 = nhid("-6", 302, "2001:db8::/32").unwrap();
        // Again, and from a new connection (a restarted agent): nothing to do.
        assert_eq!(
            kernel.apply(index, &first, &owned()).await.unwrap(),
            ApplyReport::default()
        );
        let restarted = Kernel::connect().unwrap();
        assert_eq!(
            restarted.apply(index, &first, &owned()).await.unwrap(),
            ApplyReport::default()
        );

        // gw1 gone (see desired_second): the two shared groups lose it in place — their routes stay —, the
        // {gw1} groups and gw1's members go. Replaced: 2 groups, routes 300 default and 302 ::/0 (to
        // unreachable); removed: rule and route of 301, 3 neighbour/FDB, 2 groups, 2 members.
        let second = desired_second();
        let routes_before = run("ip -o -4 route show table 303");
        let done = restarted.apply(index, &second, &owned()).await.unwrap();
        assert_eq!(done, report(0, 4, 9));
        assert_eq!(nhid("-4", 303, "default"), Some(shared_v4));
        assert_eq!(nhid("-6", 302, "2001:db8::/32"), Some(shared_v6));
        assert_eq!(
            nexthop_state(),
            expect(&[
                "id #2 group #6 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #4 group #8 type resilient buckets 64 idle_timer 120 unbalanced_timer 0 unbalanced_time 0 proto 242",
                "id #6 via 10.244.2.9 dev egress.calico scope link proto 242 onlink",
                "id #8 via fe80::a02a:aff:fef4:209 dev egress.calico scope link proto 242",
            ])
        );
        assert_ne!(
            run("ip -o -4 route show table 303"),
            routes_before,
            "the dump shows the members"
        );
        assert_eq!(
            restarted.apply(index, &second, &owned()).await.unwrap(),
            ApplyReport::default()
        );

        // And back: gw1 rejoins the shared groups in place; the single-gateway routes get new groups.
        let done = restarted.apply(index, &first, &owned()).await.unwrap();
        assert_eq!(nhid("-4", 303, "default"), Some(shared_v4));
        assert_eq!(nhid("-4", 301, "default"), Some(shared_v4));
        // Added: rule + route 301, 3 neighbour/FDB, 2 members, 2 groups; replaced: 2 groups and the two
        // routes that were unreachable.
        assert_eq!(done, report(2 + 3 + 2 + 2, 4, 0));

        // Cleanup: 4 rules + 9 routes + 4 neighbours + 2 FDB entries + the device + 8 nexthops; the
        // foreign nexthops stay.
        let done = restarted.cleanup(&owned()).await.unwrap();
        assert_eq!(done, report(0, 0, 20 + 8));
        assert_eq!(run("ip -o nexthop show proto 242"), "");
        assert_eq!(
            run("ip -o nexthop show"),
            format!(
                "id 7 via 10.9.0.7 dev u0 scope link proto static\n\
                 id {foreign_in_range} via 10.9.0.8 dev u0 scope link proto static"
            )
        );
        assert_eq!(foreign_objects(), FOREIGN);
    });
}

/// With resilient groups a failover is one group replace, whatever the number of pod tables.
#[test]
fn apply_time_of_a_failover_with_groups() {
    in_netns("apply_time_groups", || async {
        underlay().await;
        let kernel = Kernel::connect().unwrap();
        let index = kernel.ensure_vxlan(&spec()).await.unwrap();
        let owned = Ownership {
            tables: 1000..=1999,
            ..owned()
        };
        let pods = 300;
        let steady = desired_at_scale(pods, false);
        let mut failed = steady.clone();
        for kind in failed.routes.values_mut() {
            if *kind == RouteKind::Via(vec![IpAddr::V4(gw1()), IpAddr::V4(gw2())]) {
                *kind = RouteKind::Via(vec![IpAddr::V4(gw2())]);
            }
        }
        kernel.apply(index, &steady, &owned).await.unwrap();
        let mut flips = Vec::new();
        for i in 0..20 {
            let (target, want) = if i % 2 == 0 {
                // The group loses gw1; then gw1's IPv4 member, which no group holds, goes.
                (&failed, report(0, 1, 1))
            } else {
                (&steady, report(1, 1, 0))
            };
            let began = Instant::now();
            let done = kernel.apply(index, target, &owned).await.unwrap();
            flips.push(began.elapsed());
            assert_eq!(done, want, "one group replace (and the member)");
        }
        flips.sort();
        let mean = flips.iter().sum::<Duration>() / u32::try_from(flips.len()).unwrap();
        println!(
            "apply with {pods} pods on resilient groups: a gateway leaving or returning (one group \
             replace): mean {mean:?}, min {:?}, max {:?}",
            flips[0],
            flips[flips.len() - 1]
        );
        kernel.cleanup(&owned).await.unwrap();
    });
}

/// The gateway the kernel picks for each of 128 UDP flows from pod 10.0.1.1 (source ports 20000..20128)
/// to 192.0.2.10:7000: `ip route get` runs the real path selection (rule, table, multipath hash on the
/// ports, group bucket).
fn chosen_gateways() -> Vec<String> {
    (20000..20128)
        .map(|sport| {
            let out = run(&format!(
                "ip -4 route get 192.0.2.10 from 10.0.1.1 ipproto udp sport {sport} dport 7000"
            ));
            let words: Vec<&str> = out.split_whitespace().collect();
            let at = words
                .iter()
                .position(|w| *w == "via")
                .unwrap_or_else(|| panic!("{out}"));
            words[at + 1].to_owned()
        })
        .collect()
}

/// Why the groups: three gateways, and the first one leaves (under hash-threshold the first next hop's
/// removal shifts every other range), then comes back. With a resilient group no flow of the two others
/// changes gateway when it leaves, and no (busy) flow when it returns; with a multipath route (the
/// fallback) some do, both times.
#[test]
fn when_a_gateway_leaves_only_its_flows_move_with_groups_not_with_multipath() {
    in_netns("only_its_flows_move", || async {
        underlay().await;
        // The pod's address, local here so that `ip route get ... from` it works.
        run("ip addr add 10.0.1.1/32 dev u0");
        let gw3 = v4("10.244.3.7");
        let desired = |gateways: &[Ipv4Addr]| {
            let mut d = Desired::default();
            d.rules.insert(rule("10.0.1.1", 300));
            d.routes.insert(
                (300, net("0.0.0.0/0")),
                RouteKind::Via(gateways.iter().map(|g| IpAddr::V4(*g)).collect()),
            );
            add_gateways(&mut d, &[gw1(), gw2(), gw3]);
            d
        };
        for mode in [Mode::Resilient, Mode::Multipath] {
            let kernel = Kernel::connect().unwrap();
            kernel.force_mode(mode);
            let index = kernel.ensure_vxlan(&spec()).await.unwrap();
            // Hash on the ports (fib_multipath_hash_policy=1), as on a node.
            super::set_sysctls(DEVICE).unwrap();
            kernel
                .apply(index, &desired(&[gw1(), gw2(), gw3]), &owned())
                .await
                .unwrap();
            let before = chosen_gateways();
            let spread: BTreeSet<&String> = before.iter().collect();
            assert_eq!(spread.len(), 3, "{mode:?}: {before:?}");
            kernel
                .apply(index, &desired(&[gw2(), gw3]), &owned())
                .await
                .unwrap();
            let after = chosen_gateways();
            let gone = gw1().to_string();
            let (mut theirs, mut moved) = (0, 0);
            for (was, now) in before.iter().zip(&after) {
                assert_ne!(*now, gone);
                if *was != gone {
                    theirs += 1;
                    if now != was {
                        moved += 1;
                    }
                }
            }
            println!(
                "{mode:?}: gateway 1 of 3 leaves: {moved} of the other gateways' {theirs} flows change gateway"
            );
            // Gateway 1 comes back. `ip route get` marks the bucket it picks as used, so every bucket of
            // these flows is busy: with a group none moves (only idle buckets go to gateway 1).
            kernel
                .apply(index, &desired(&[gw1(), gw2(), gw3]), &owned())
                .await
                .unwrap();
            let back = chosen_gateways();
            let moved_back = after.iter().zip(&back).filter(|(a, b)| a != b).count();
            println!(
                "{mode:?}: gateway 1 back: {moved_back} of the {} flows change gateway",
                back.len()
            );
            match mode {
                Mode::Resilient => assert_eq!((moved, moved_back), (0, 0)),
                Mode::Multipath => {
                    assert!(moved > 0 && moved_back > 0, "hash-threshold moved nothing?")
                }
            }
            kernel.cleanup(&owned()).await.unwrap();
        }
    });
}

// Unprivileged tests of this file's own logic.

#[test]
fn connect_needs_a_runtime() {
    let e = Kernel::connect().unwrap_err();
    assert!(matches!(e, KernelError::NoRuntime), "{e:?}");
}

#[test]
fn partial_failure_says_what_went_through_and_the_first_error() {
    let mut progress = super::Progress {
        attempted: 3,
        done: report(1, 0, 0),
        ..super::Progress::default()
    };
    progress.fail(KernelError::Netlink {
        what: "add route 10.0.0.0/8 table 201".into(),
        source: io::Error::from_raw_os_error(libc::EEXIST),
    });
    progress.fail(KernelError::Closed {
        what: "add rule from 10.0.1.1 lookup 201 priority 100".into(),
    });
    let e = progress.finish().unwrap_err();
    assert_eq!(
        e.to_string(),
        "2 of 3 kernel changes failed (1 added, 0 replaced, 0 removed went through); first: add route \
         10.0.0.0/8 table 201: File exists (os error 17)"
    );
    assert_eq!(
        super::Progress::default().finish().unwrap(),
        ApplyReport::default()
    );
}

#[test]
fn only_an_unsupported_answer_to_the_probe_falls_back_to_multipath() {
    let netlink = |errno| KernelError::Netlink {
        what: "probe: add resilient nexthop group 4076011518".into(),
        source: io::Error::from_raw_os_error(errno),
    };
    for errno in [libc::EOPNOTSUPP, libc::EINVAL, libc::EAFNOSUPPORT] {
        assert!(super::unsupported(&netlink(errno)), "{errno}");
    }
    for errno in [libc::EPERM, libc::ENETDOWN, libc::EEXIST] {
        assert!(!super::unsupported(&netlink(errno)), "{errno}");
    }
    assert!(!super::unsupported(&KernelError::Closed {
        what: "probe".into()
    }));
}
