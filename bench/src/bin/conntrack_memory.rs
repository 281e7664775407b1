//! Memory per live flow of the conntrack table, measured with a counting global allocator and from
//! `VmRSS` in `/proc/self/status`.
//!
//! Usage: `cargo run --release -p bench --bin conntrack-memory [N...]` (default: 1000000 then 10000000).
//!
//! Mix (IPv4): 80 % TCP flows, each on its own pod endpoint (a client opens a fresh ephemeral port per
//! connection); 20 % UDP flows whose pod endpoints each talk to two remotes (DNS-like: one socket, two
//! resolvers), so endpoint-independent mapping shares their external port. 1000 flows per pod IP. Egress IPs:
//! `ceil(N / 64512)`, so the TCP pools run at ~80 % and every flow finds a port. The table is sized to
//! exactly `max_entries = N`.

use core::net::{IpAddr, Ipv4Addr};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use forwarder_core::conntrack::{Config, NewFlow, Table};
use forwarder_core::flow::{FlowKey, NodeAddr, Proto};
use forwarder_core::ports::{PortPools, PortRange, Rng};
use forwarder_core::Instant;

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        let now = ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        let now = ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        PEAK.fetch_max(ALLOCATED.load(Ordering::Relaxed), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn flow(i: u32, ips: &[IpAddr]) -> NewFlow {
    // 5 flows in a group of 5: 4 TCP endpoints, then one UDP endpoint with 2 remotes (every other group)
    let tcp = i % 5 != 4;
    let pod = i / 1000;
    let (sport, dst) = if tcp {
        (10_000 + (i % 1000), 0xCB00_7100 + (i % 4093))
    } else {
        // UDP flows come in pairs: flows 4 and 9 of each group of 10 share the endpoint
        (20_000 + ((i / 10) % 1000), 0xC000_0235 + (i / 5) % 2)
    };
    #[allow(clippy::cast_possible_truncation)] // < 65536
    let sport = sport as u16;
    NewFlow {
        orig: FlowKey {
            src: IpAddr::V4(Ipv4Addr::from(0x0A00_0000 + pod)),
            dst: IpAddr::V4(Ipv4Addr::from(dst)),
            src_port: sport,
            dst_port: if tcp { 443 } else { 53 },
            proto: if tcp { Proto::Tcp } else { Proto::Udp },
        },
        // an endpoint's egress IP must not depend on the remote: choose by pod and endpoint
        egress_ip: ips[((pod as usize) * 7 + usize::from(sport)) % ips.len()],
        node: NodeAddr {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            mac: [2, 0, 0, 0, 0, 1],
        },
        uplink: 0,
    }
}

fn measure(n: u32) {
    let ips: Vec<IpAddr> = (0..n.div_ceil(64_512))
        .map(|i| IpAddr::V4(Ipv4Addr::from(0xC633_0000 + i)))
        .collect();
    let before_alloc = ALLOCATED.load(Ordering::Relaxed);
    let before_rss = rss_bytes();
    let table = Table::new(
        Config {
            max_entries: n,
            ..Config::default()
        },
        PortPools::new(&ips, PortRange::default()),
    );
    let mut rng = Rng::new(0x5eed);
    let mut refused = 0u32;
    let start = std::time::Instant::now();
    {
        let g = table.pin();
        for i in 0..n {
            if table
                .insert(flow(i, &ips), Instant::ZERO, &mut rng, &g)
                .is_err()
            {
                refused += 1;
            }
        }
    }
    let took = start.elapsed();
    let live = table.len();
    let alloc = ALLOCATED.load(Ordering::Relaxed) - before_alloc;
    let rss = rss_bytes().saturating_sub(before_rss);
    let ports_in_use: u32 = table.pools().usage().iter().map(|u| u.in_use).sum();
    #[allow(clippy::cast_precision_loss)] // reporting
    let per = |b: usize| b as f64 / live.max(1) as f64;
    println!(
        "N={n} live={live} refused={refused} egress_ips={} ports_in_use={ports_in_use} insert_time={:.2}s",
        ips.len(),
        took.as_secs_f64()
    );
    println!(
        "  allocated: {:.1} MB = {:.1} B/flow (table arena+indexes {:.1} B/flow)   RSS delta: {:.1} MB = {:.1} B/flow",
        alloc as f64 / 1e6,
        per(alloc),
        per(table.allocated_bytes()),
        rss as f64 / 1e6,
        per(rss)
    );
    // the lookup + refresh path must not allocate
    let allocs_before = ALLOCS.load(Ordering::Relaxed);
    let mut hits = 0u32;
    {
        let g = table.pin();
        let now = Instant::from_secs(1);
        for i in (0..n).step_by(7).take(1_000_000) {
            let k = flow(i, &ips).orig;
            if let Some(f) = table.lookup_outbound_at(&k, now, &g) {
                f.on_outbound(None, 64, now);
                if table.lookup_inbound_at(&f.reply_key(), now, &g).is_some() {
                    hits += 1;
                }
            }
        }
    }
    println!(
        "  lookups+refresh: {hits} hits, {} heap allocations",
        ALLOCS.load(Ordering::Relaxed) - allocs_before
    );
    drop(table);
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let sizes = if args.is_empty() {
        vec![1_000_000, 10_000_000]
    } else {
        args
    };
    println!(
        "flow slot: {} bytes; mix: 80% TCP (1 flow/endpoint), 20% UDP (2 remotes/endpoint)",
        core::mem::size_of::<forwarder_core::conntrack::Flow>()
    );
    for n in sizes {
        measure(n);
    }
    println!(
        "peak allocated: {:.1} MB",
        PEAK.load(Ordering::Relaxed) as f64 / 1e6
    );
}
