//! Reading and writing the node's kernel state through rtnetlink: the vxlan device, the ip rules, the routes
//! of the per-pod tables, static neighbours and FDB entries. What the agent owns — and so may change or
//! delete — is defined in [`super::state`]; nothing else is ever touched.
//!
//! Routes via gateways point at **resilient nexthop groups** ([`groups`]; Linux ≥ 5.13): when a replica
//! leaves, only its hash buckets move, so the other replicas' flows stay where their NAT state is. Where
//! the kernel has no such groups (found once, by a probe before the first apply: [`Kernel::mode`]), they
//! are multipath routes (`RTA_MULTIPATH`, hash-threshold) as before.
//!
//! Reconcile by diff. [`Kernel::apply`] dumps what the agent owns (one dump per object type), compares it
//! with the desired state and sends only the requests that close the gap, in an order that never lets a
//! pod's rule point at a table that is not written yet, a route at a group that is not there, nor a route
//! at a neighbour that is gone:
//!
//! 1. rules that are no longer wanted are removed (before their tables empty);
//! 2. neighbours and FDB entries are added or replaced (before routes use them);
//! 3. member nexthops are added (before the groups that hold them), then groups are added or replaced — a
//!    group whose members change is one `NLM_F_REPLACE` of the group, whatever the number of pod tables
//!    using it: that is the failover;
//! 4. routes are added or replaced — a replace is one `NLM_F_CREATE | NLM_F_REPLACE` request, atomic also when
//!    the route changes kind (group → unreachable);
//! 5. routes that are no longer wanted are removed; then the groups no route uses (the kernel would delete
//!    the routes of a group it deletes, so this waits for them to move off — and is skipped altogether in
//!    an apply in which a route could not be written), the members no group uses, and the neighbours and
//!    FDB entries;
//! 6. new rules are added — except those whose table could not be fully written: a pod whose table is
//!    incomplete keeps no rule rather than falling through to normal routing.
//!
//! A failed request does not stop the others; [`Kernel::apply`] then returns [`KernelError::Partial`] with the
//! first failure, and the next apply retries what is still missing.
//!
//! The pure parts (building messages, reading what the kernel reports, the diff) live in [`route`], [`rule`],
//! [`neighbour`], [`nexthop`], [`groups`] and [`link`]; this file does the I/O. Nexthop messages, which
//! netlink-packet-route does not have, go over a netlink socket of their own. [`set_sysctls`] ([`sysctl`])
//! is the one part that does not speak netlink.

mod groups;
mod link;
mod neighbour;
mod nexthop;
mod route;
mod rule;
mod sysctl;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use ipnet::IpNet;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR,
    NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use rtnetlink::Handle;

use super::state::{ApplyReport, Desired, Ownership, VxlanSpec, DEVICE_ALIAS};

/// How often a dump is retried when the kernel says it was interrupted by a concurrent change.
const DUMP_ATTEMPTS: usize = 3;

/// Why the kernel (or `/proc/sys`) refused; every message names the object.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KernelError {
    /// The rtnetlink socket could not be opened.
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    /// [`Kernel::connect`] was called outside a tokio runtime.
    #[error("cannot start the rtnetlink connection: Kernel::connect must be called inside a tokio runtime")]
    NoRuntime,
    /// The kernel refused a request or a dump, e.g.
    /// `add route 10.0.0.0/8 table 201: File exists (os error 17)`.
    #[error("{what}: {source}")]
    Netlink {
        /// The request: verb and object.
        what: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The rtnetlink connection task is gone (its socket failed).
    #[error("{what}: the rtnetlink connection is closed; restart the agent")]
    Closed {
        /// The request that could not be sent.
        what: String,
    },
    /// A dump was interrupted by concurrent changes every time it was tried.
    #[error("{what}: interrupted by concurrent changes {DUMP_ATTEMPTS} times in a row; try again")]
    Interrupted {
        /// The dump.
        what: String,
    },
    /// A device with the vxlan device's name exists, and the agent did not create it.
    #[error(
        "device {device} exists but was not created by the node agent (its alias is {alias:?}, not {ours:?}); \
         it will not be touched: remove it, or configure another device name",
        ours = DEVICE_ALIAS
    )]
    ForeignDevice {
        /// The device's name.
        device: String,
        /// Its alias (empty when it has none).
        alias: String,
    },
    /// A device the agent needs (the underlay) does not exist.
    #[error("device {0} not found")]
    NoSuchDevice(String),
    /// A device name the kernel would refuse, or that cannot name a sysctl directory.
    #[error("invalid device name {name:?}: {reason}")]
    InvalidDeviceName {
        /// The name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A desired route the agent cannot or may not write (a planner bug; nothing was sent for it).
    #[error("route {dst} table {table}: {reason}")]
    InvalidRoute {
        /// The route's table.
        table: u32,
        /// Its destination.
        dst: IpNet,
        /// What is wrong.
        reason: &'static str,
    },
    /// A desired rule the agent may not write (a planner bug; nothing was sent for it).
    #[error("rule from {src} lookup {table} priority {priority}: {reason}")]
    InvalidRule {
        /// The rule's source address.
        src: std::net::IpAddr,
        /// Its table.
        table: u32,
        /// Its priority.
        priority: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// Reading or writing a sysctl file failed.
    #[error("{verb} {}: {source}", .path.display())]
    Sysctl {
        /// `read` or `write`.
        verb: &'static str,
        /// The file under `/proc/sys`.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Some requests of one apply failed; the others went through.
    #[error(
        "{failed} of {attempted} kernel changes failed ({} added, {} replaced, {} removed went through); first: {first}",
        .done.added, .done.replaced, .done.removed
    )]
    Partial {
        /// The first failure.
        first: Box<KernelError>,
        /// How many requests failed (or were skipped because one they depend on failed).
        failed: usize,
        /// How many requests were planned.
        attempted: usize,
        /// What went through.
        done: ApplyReport,
    },
}

/// What one request does to the report when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Added,
    Replaced,
    Removed,
}

/// A request: an rtnetlink message of netlink-packet-route, or a nexthop message ([`nexthop`]).
#[derive(Debug, Clone)]
enum Message {
    Rtnl(RouteNetlinkMessage),
    Nexthop(nexthop::Request),
}

impl From<RouteNetlinkMessage> for Message {
    fn from(message: RouteNetlinkMessage) -> Self {
        Message::Rtnl(message)
    }
}

/// How the agent writes routes via several gateways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Resilient nexthop groups (`nhid`).
    Resilient,
    /// Multipath routes (`RTA_MULTIPATH`, hash-threshold): the kernel has no resilient groups.
    Multipath,
}

impl Mode {
    /// `resilient` or `multipath` (the metric's label).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Resilient => "resilient",
            Mode::Multipath => "multipath",
        }
    }
}

/// One planned request: built by the pure planners in the submodules, sent by [`Kernel`].
#[derive(Debug, Clone)]
struct Change {
    /// Verb and object, for errors and logs: `add route 10.0.0.0/8 table 201`.
    what: String,
    /// The request.
    message: Message,
    /// Netlink flags besides `NLM_F_REQUEST | NLM_F_ACK`: `NLM_F_CREATE | NLM_F_REPLACE`, ...
    flags: u16,
    /// How it counts.
    effect: Effect,
    /// How many objects it counts for (deleting an FDB entry removes all its destinations).
    objects: usize,
    /// The route table it writes, if it is a route (a rule is only added when its table was written).
    table: Option<u32>,
}

/// The progress of one apply or cleanup.
#[derive(Debug, Default)]
struct Progress {
    done: ApplyReport,
    attempted: usize,
    failed: usize,
    first: Option<KernelError>,
    /// Tables a route request failed for.
    broken_tables: BTreeSet<u32>,
}

impl Progress {
    fn fail(&mut self, error: KernelError) {
        tracing::warn!(error = %error, "kernel change failed");
        self.failed += 1;
        if self.first.is_none() {
            self.first = Some(error);
        }
    }

    fn finish(self) -> Result<ApplyReport, KernelError> {
        match self.first {
            None => Ok(self.done),
            Some(first) => Err(KernelError::Partial {
                first: Box::new(first),
                failed: self.failed,
                attempted: self.attempted,
                done: self.done,
            }),
        }
    }
}

/// The rtnetlink connection through which the agent reads and writes the kernel's state.
#[derive(Clone)]
pub(crate) struct Kernel {
    handle: Handle,
    /// The socket for nexthop messages; one exchange at a time.
    nexthops: Arc<tokio::sync::Mutex<TokioSocket>>,
    /// Sequence numbers of the nexthop socket.
    sequence: Arc<AtomicU32>,
    /// Groups or multipath, once probed.
    mode: Arc<Mutex<Option<Mode>>>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("mode", &self.current_mode())
            .finish_non_exhaustive()
    }
}

impl Kernel {
    /// Opens an rtnetlink connection (spawns the connection task on the current tokio runtime).
    ///
    /// The socket asks for strict checking of dump requests (Linux ≥ 4.20), so that the kernel filters route
    /// dumps by protocol and neighbour dumps by device; on older kernels everything is filtered here instead.
    pub(crate) fn connect() -> Result<Self, KernelError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| KernelError::NoRuntime)?;
        let (connection, handle, _unsolicited) = match rtnetlink::new_connection_with_strict_check()
        {
            Ok(parts) => parts,
            Err(e) => {
                tracing::debug!(error = %e, "no strict netlink dump checking; filtering dumps in userspace");
                rtnetlink::new_connection().map_err(KernelError::Socket)?
            }
        };
        runtime.spawn(connection);
        let mut socket =
            TokioSocket::new(libc::NETLINK_ROUTE as isize).map_err(KernelError::Socket)?;
        socket
            .socket_mut()
            .bind_auto()
            .and_then(|_| socket.socket_ref().connect(&SocketAddr::new(0, 0)))
            .map_err(KernelError::Socket)?;
        Ok(Kernel {
            handle,
            nexthops: Arc::new(tokio::sync::Mutex::new(socket)),
            sequence: Arc::new(AtomicU32::new(1)),
            mode: Arc::new(Mutex::new(None)),
        })
    }

    /// The mode found by the probe, if it ran.
    pub(crate) fn current_mode(&self) -> Option<Mode> {
        self.mode.lock().ok().and_then(|m| *m)
    }

    /// How routes via gateways are written: [`Mode::Resilient`] when the kernel accepts a resilient nexthop
    /// group, else [`Mode::Multipath`] (logged once, at warn). Probed once, with the vxlan device
    /// `device_index` (up): a member nexthop (`via 192.0.2.1 dev <vxlan> onlink`) and a resilient group of it, at the top two ids of
    /// `owned.nexthops`, both deleted again. A kernel without nexthop objects (< 5.3) answers
    /// `EOPNOTSUPP`, one without resilient groups (< 5.13) `EINVAL`; any other error is returned and the
    /// probe runs again at the next apply.
    pub(crate) async fn mode(
        &self,
        device_index: u32,
        owned: &Ownership,
    ) -> Result<Mode, KernelError> {
        if let Some(mode) = self.current_mode() {
            return Ok(mode);
        }
        let mode = match self.probe(device_index, owned).await {
            Ok(()) => {
                tracing::info!("routes via gateways use resilient nexthop groups");
                Mode::Resilient
            }
            Err(e) if unsupported(&e) => {
                tracing::warn!(
                    error = %e,
                    "the kernel has no resilient nexthop groups (Linux >= 5.13); routes via several gateways \
                     are multipath routes, and when a gateway leaves or comes back some flows of the other \
                     gateways move too"
                );
                Mode::Multipath
            }
            Err(e) => return Err(e),
        };
        if let Ok(mut m) = self.mode.lock() {
            *m = Some(mode);
        }
        Ok(mode)
    }

    /// Sets the mode without probing (tests of the multipath path).
    #[cfg(test)]
    pub(crate) fn force_mode(&self, mode: Mode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = Some(mode);
        }
    }

    async fn probe(&self, device_index: u32, owned: &Ownership) -> Result<(), KernelError> {
        let (member, group) = groups::probe_ids(&owned.nexthops);
        let replace = NLM_F_CREATE | rtnetlink::packet_core::NLM_F_REPLACE;
        let member_request = nexthop::Request::new(&nexthop::Nexthop {
            id: member,
            protocol: super::state::RTPROT_EGRESS,
            kind: nexthop::Kind::Member {
                // A documentation address (RFC 5737), onlink: valid on any device that is up.
                gateway: std::net::IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)),
                device: device_index,
                onlink: true,
            },
        });
        let group_request = nexthop::Request::new(&nexthop::Nexthop {
            id: group,
            protocol: super::state::RTPROT_EGRESS,
            kind: nexthop::Kind::Group {
                entries: vec![nexthop::Entry {
                    id: member,
                    weight: 1,
                }],
                resilient: Some(nexthop::RESILIENT),
            },
        });
        let (Some(member_request), Some(group_request)) = (member_request, group_request) else {
            return Ok(());
        };
        self.nexthop_change(
            member_request,
            replace,
            &format!("probe: add nexthop {member}"),
        )
        .await?;
        let grouped = self
            .nexthop_change(
                group_request,
                replace,
                &format!("probe: add resilient nexthop group {group}"),
            )
            .await;
        if grouped.is_ok() {
            self.nexthop_change(
                nexthop::Request::delete(group),
                0,
                &format!("probe: delete nexthop group {group}"),
            )
            .await?;
        }
        self.nexthop_change(
            nexthop::Request::delete(member),
            0,
            &format!("probe: delete nexthop {member}"),
        )
        .await?;
        grouped
    }

    /// Creates the vxlan device if it is missing (`type vxlan id <vni> dstport <port> local <local> dev
    /// <underlay> nolearning`, the MTU, `ifalias` [`DEVICE_ALIAS`], up) and returns its ifindex.
    ///
    /// If it exists with the agent's alias, its MTU and up state are fixed; if its VNI, port, local address,
    /// underlay device or learning differ it is deleted and created again (which flushes its routes,
    /// neighbours and FDB: the next [`Kernel::apply`] writes them back). A device of that name without the
    /// agent's alias is never touched: [`KernelError::ForeignDevice`].
    pub(crate) async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, KernelError> {
        link::check_name(&spec.device)?;
        let underlay = self
            .link_by_name(&spec.underlay_device)
            .await?
            .ok_or_else(|| KernelError::NoSuchDevice(spec.underlay_device.clone()))?
            .header
            .index;
        let Some(existing) = self.link_by_name(&spec.device).await? else {
            return self.create_vxlan(spec, underlay).await;
        };
        let found = link::Observed::read(&existing);
        if !found.is_ours() {
            return Err(KernelError::ForeignDevice {
                device: spec.device.clone(),
                alias: found.alias.unwrap_or_default(),
            });
        }
        let differences = found.tunnel_differences(spec, underlay);
        if !differences.is_empty() {
            tracing::info!(
                device = %spec.device,
                differences = %differences.join(", "),
                "vxlan device differs from the configuration; creating it again"
            );
            self.delete_link(found.index, &spec.device).await?;
            return self.create_vxlan(spec, underlay).await;
        }
        if let Some(fix) = link::fix_message(&found, spec) {
            tracing::info!(device = %spec.device, mtu = spec.mtu, "setting the vxlan device's MTU and up");
            self.change(
                RouteNetlinkMessage::SetLink(fix),
                0,
                &format!("set mtu {} up on device {}", spec.mtu, spec.device),
            )
            .await?;
        }
        Ok(found.index)
    }

    /// Reconciles the kernel with `desired` (see the module documentation for the order).
    ///
    /// Reads what the agent owns — rules with protocol [`super::state::RTPROT_EGRESS`], priority
    /// `owned.rule_priority` and a table in `owned.tables`; routes of both families with that protocol in those
    /// tables; permanent neighbours (IPv4 and IPv6) and FDB entries on the device `device_index` — adds what is
    /// missing, replaces what differs and deletes what is owned but no longer wanted. Returns the counts:
    /// [`ApplyReport::default`] when the kernel already held `desired`.
    pub(crate) async fn apply(
        &self,
        device_index: u32,
        desired: &Desired,
        owned: &Ownership,
    ) -> Result<ApplyReport, KernelError> {
        let rules = rule::owned(&self.dump(rule::dump_request(), "dump rules").await?, owned);
        let routes = self.owned_routes(owned).await?;
        let neighbours = neighbour::observed(
            &self
                .dump(neighbour::dump_request(device_index), "dump neighbours")
                .await?,
            device_index,
        );
        let fdb = neighbour::observed_fdb(
            &self
                .dump(neighbour::fdb_dump_request(device_index), "dump FDB")
                .await?,
            device_index,
        );

        let groups = match self.mode(device_index, owned).await? {
            Mode::Resilient => {
                let dumped = self.dump_nexthops().await?;
                let taken: BTreeSet<u32> = dumped.iter().map(|n| n.id).collect();
                let shapes = desired
                    .routes
                    .iter()
                    .filter_map(|(&(table, dst), kind)| {
                        let shape = route::Shape::desired(dst, kind, device_index).ok()?;
                        Some(((table, dst), shape))
                    })
                    .collect();
                groups::plan(
                    &groups::owned(&dumped, owned),
                    &taken,
                    &shapes,
                    &groups::current(&routes),
                    &owned.nexthops,
                )
            }
            Mode::Multipath => groups::Plan::default(),
        };

        let rules = rule::plan(&rules, &desired.rules, owned)?;
        let routes = route::plan(routes, &desired.routes, device_index, owned, &groups.routes)?;
        let name = &owned.device;
        let neighbours = neighbour::plan(&neighbours, &desired.neighbours, device_index, name);
        let fdb = neighbour::plan_fdb(&fdb, &desired.fdb, device_index, name);

        let mut progress = Progress::default();
        self.run(&mut progress, rules.remove).await;
        self.run(&mut progress, neighbours.upsert).await;
        self.run(&mut progress, fdb.upsert).await;
        self.run(&mut progress, groups.add_members).await;
        self.run(&mut progress, groups.upsert_groups).await;
        self.run(&mut progress, routes.upsert).await;
        self.run(&mut progress, routes.remove).await;
        if progress.broken_tables.is_empty() {
            // Deleting a group deletes the routes still on it: only once every route has moved.
            self.run(&mut progress, groups.remove_groups).await;
            self.run(&mut progress, groups.remove_members).await;
        }
        self.run(&mut progress, neighbours.remove).await;
        self.run(&mut progress, fdb.remove).await;
        self.run(&mut progress, rules.add).await;
        progress.finish()
    }

    /// Removes every rule and route the agent owns (as in [`Kernel::apply`]) and deletes the vxlan device
    /// `owned.device` if it carries the agent's alias, which removes its neighbours and FDB entries. A device
    /// of that name without the alias is left alone (with a warning).
    ///
    /// `removed` counts the rules, the routes, the device's permanent neighbours and FDB entries, and the
    /// device itself.
    pub(crate) async fn cleanup(&self, owned: &Ownership) -> Result<ApplyReport, KernelError> {
        let rules = rule::owned(&self.dump(rule::dump_request(), "dump rules").await?, owned);
        let routes = self.owned_routes(owned).await?;
        let rules = rule::plan(&rules, &BTreeSet::new(), owned)?;
        let routes = route::plan(routes, &BTreeMap::new(), 0, owned, &BTreeMap::new())?;
        // Every owned nexthop, groups first. A kernel without nexthop objects has none to dump.
        let nexthops = match self.dump_nexthops().await {
            Ok(dumped) => groups::plan(
                &groups::owned(&dumped, owned),
                &BTreeSet::new(),
                &BTreeMap::new(),
                &BTreeMap::new(),
                &owned.nexthops,
            ),
            Err(KernelError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                groups::Plan::default()
            }
            Err(e) => return Err(e),
        };

        let mut progress = Progress::default();
        self.run(&mut progress, rules.remove).await;
        self.run(&mut progress, routes.remove).await;
        self.run(&mut progress, nexthops.remove_groups).await;
        self.run(&mut progress, nexthops.remove_members).await;

        if let Some(existing) = self.link_by_name(&owned.device).await? {
            let found = link::Observed::read(&existing);
            if found.is_ours() {
                let index = found.index;
                let neighbours = neighbour::observed(
                    &self
                        .dump(neighbour::dump_request(index), "dump neighbours")
                        .await?,
                    index,
                );
                let fdb = neighbour::observed_fdb(
                    &self
                        .dump(neighbour::fdb_dump_request(index), "dump FDB")
                        .await?,
                    index,
                );
                let contents = neighbours.iter().filter(|n| n.permanent).count() + fdb.len();
                progress.attempted += 1;
                match self.delete_link(index, &owned.device).await {
                    Ok(()) => progress.done.removed += contents + 1,
                    Err(e) => progress.fail(e),
                }
            } else {
                tracing::warn!(
                    device = %owned.device,
                    alias = found.alias.as_deref().unwrap_or(""),
                    "not deleting the device: the node agent did not create it"
                );
            }
        }
        progress.finish()
    }

    /// Owned routes of both families.
    async fn owned_routes(&self, owned: &Ownership) -> Result<Vec<route::Owned>, KernelError> {
        let mut routes = Vec::new();
        for (family, what) in route::FAMILIES {
            let dumped = self.dump(route::dump_request(family), what).await?;
            routes.extend(route::owned(&dumped, owned));
        }
        Ok(routes)
    }

    /// Every nexthop object of the namespace (the agent's and anyone's).
    async fn dump_nexthops(&self) -> Result<Vec<nexthop::Nexthop>, KernelError> {
        for _ in 0..DUMP_ATTEMPTS {
            let (answers, interrupted) = self
                .nexthop_exchange(
                    nexthop::Request::dump(),
                    NLM_F_REQUEST | NLM_F_DUMP,
                    "dump nexthops",
                )
                .await?;
            if !interrupted {
                return Ok(answers);
            }
        }
        Err(KernelError::Interrupted {
            what: "dump nexthops".to_owned(),
        })
    }

    /// Sends one acknowledged nexthop change.
    async fn nexthop_change(
        &self,
        request: nexthop::Request,
        flags: u16,
        what: &str,
    ) -> Result<(), KernelError> {
        self.nexthop_exchange(request, NLM_F_REQUEST | NLM_F_ACK | flags, what)
            .await
            .map(|_| ())
    }

    /// Sends one nexthop request on the nexthop socket and reads the answers up to its acknowledgement or
    /// the end of its dump. Answers to other sequence numbers (left by an exchange that was cancelled) are
    /// skipped; anything that does not parse is an error.
    async fn nexthop_exchange(
        &self,
        request: nexthop::Request,
        flags: u16,
        what: &str,
    ) -> Result<(Vec<nexthop::Nexthop>, bool), KernelError> {
        let netlink = |source: io::Error| KernelError::Netlink {
            what: what.to_owned(),
            source,
        };
        let socket = self.nexthops.lock().await;
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let mut message = NetlinkMessage::new(
            rtnetlink::packet_core::NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(request),
        );
        message.header.flags = flags;
        message.header.sequence_number = sequence;
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        socket.send(&bytes).await.map_err(netlink)?;
        let mut found = Vec::new();
        let mut interrupted = false;
        loop {
            let (datagram, _) = socket.recv_from_full().await.map_err(netlink)?;
            let mut offset = 0;
            while offset < datagram.len() {
                let rest = &datagram[offset..];
                let answer = NetlinkMessage::<nexthop::Reply>::deserialize(rest).map_err(|e| {
                    netlink(io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
                })?;
                let length = usize::try_from(answer.header.length).unwrap_or(usize::MAX);
                if length == 0 {
                    return Err(netlink(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a netlink message of length 0",
                    )));
                }
                offset = offset.saturating_add(length.next_multiple_of(4));
                if answer.header.sequence_number != sequence {
                    continue;
                }
                interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
                match answer.payload {
                    NetlinkPayload::InnerMessage(nexthop::Reply(Some(n))) => found.push(n),
                    NetlinkPayload::InnerMessage(nexthop::Reply(None)) | NetlinkPayload::Noop => {}
                    NetlinkPayload::Error(error) => match error.code {
                        Some(_) => return Err(netlink(error.to_io())),
                        // The acknowledgement.
                        None => return Ok((found, interrupted)),
                    },
                    NetlinkPayload::Done(_) => return Ok((found, interrupted)),
                    NetlinkPayload::Overrun(_) => {
                        return Err(netlink(io::Error::other(
                            "netlink overrun: the kernel dropped answers",
                        )))
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends `changes` in order, recording what went through and what failed. A rule is not added when a
    /// route of its table failed.
    async fn run(&self, progress: &mut Progress, changes: Vec<Change>) {
        for change in changes {
            progress.attempted += 1;
            let writes_route = matches!(
                change.message,
                Message::Rtnl(RouteNetlinkMessage::NewRoute(_))
            );
            let adds_rule = matches!(
                change.message,
                Message::Rtnl(RouteNetlinkMessage::NewRule(_))
            );
            if let (true, Some(table)) = (adds_rule, change.table) {
                if progress.broken_tables.contains(&table) {
                    progress.fail(KernelError::Netlink {
                        what: change.what,
                        source: io::Error::other(format!(
                            "not added: a route of table {table} could not be written"
                        )),
                    });
                    continue;
                }
            }
            tracing::debug!(change = %change.what, "kernel change");
            let sent = match change.message {
                Message::Rtnl(message) => self.change(message, change.flags, &change.what).await,
                Message::Nexthop(request) => {
                    self.nexthop_change(request, change.flags, &change.what)
                        .await
                }
            };
            match sent {
                Ok(()) => match change.effect {
                    Effect::Added => progress.done.added += change.objects,
                    Effect::Replaced => progress.done.replaced += change.objects,
                    Effect::Removed => progress.done.removed += change.objects,
                },
                Err(e) => {
                    if let (true, Some(table)) = (writes_route, change.table) {
                        progress.broken_tables.insert(table);
                    }
                    progress.fail(e);
                }
            }
        }
    }

    /// The device called `name`, if there is one.
    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, KernelError> {
        let request = RouteNetlinkMessage::GetLink(link::get_request(name));
        match self
            .exchange(request, NLM_F_REQUEST, || format!("look up device {name}"))
            .await
        {
            Ok((answers, _)) => Ok(answers.into_iter().find_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })),
            Err(KernelError::Netlink { source, .. })
                if source.raw_os_error() == Some(libc::ENODEV) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates the vxlan device and gives it the agent's alias; returns its index.
    async fn create_vxlan(&self, spec: &VxlanSpec, underlay: u32) -> Result<u32, KernelError> {
        tracing::info!(
            device = %spec.device,
            vni = spec.vni,
            port = spec.port,
            local = %spec.local,
            underlay = %spec.underlay_device,
            "creating the vxlan device"
        );
        self.change(
            RouteNetlinkMessage::NewLink(link::create_message(spec, underlay)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("create vxlan device {}", spec.device),
        )
        .await?;
        let created = self
            .link_by_name(&spec.device)
            .await?
            .ok_or_else(|| KernelError::NoSuchDevice(spec.device.clone()))?;
        let found = link::Observed::read(&created);
        if !found.is_ours() {
            // The kernel ignores IFLA_IFALIAS in RTM_NEWLINK; set it now. If that fails, do not leave behind a
            // device that the agent would then refuse to touch.
            let alias = self
                .change(
                    RouteNetlinkMessage::SetLink(link::alias_message(found.index)),
                    0,
                    &format!("set alias of device {}", spec.device),
                )
                .await;
            if let Err(e) = alias {
                if let Err(undo) = self.delete_link(found.index, &spec.device).await {
                    tracing::warn!(error = %undo, "cannot delete the device whose alias could not be set");
                }
                return Err(e);
            }
        }
        Ok(found.index)
    }

    async fn delete_link(&self, index: u32, name: &str) -> Result<(), KernelError> {
        tracing::info!(device = %name, "deleting the vxlan device");
        self.change(
            RouteNetlinkMessage::DelLink(link::delete_message(index)),
            0,
            &format!("delete device {name}"),
        )
        .await
    }

    /// Sends one acknowledged change.
    async fn change(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<(), KernelError> {
        self.exchange(message, NLM_F_REQUEST | NLM_F_ACK | flags, || {
            what.to_owned()
        })
        .await
        .map(|_| ())
    }

    /// Dumps, retrying when the kernel flags the dump as interrupted by a concurrent change.
    async fn dump(
        &self,
        request: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, KernelError> {
        for _ in 0..DUMP_ATTEMPTS {
            let (answers, interrupted) = self
                .exchange(request.clone(), NLM_F_REQUEST | NLM_F_DUMP, || {
                    what.to_owned()
                })
                .await?;
            if !interrupted {
                return Ok(answers);
            }
        }
        Err(KernelError::Interrupted {
            what: what.to_owned(),
        })
    }

    /// Sends one request and collects the kernel's answers; the flag says whether a dump was interrupted.
    async fn exchange(
        &self,
        message: RouteNetlinkMessage,
        flags: u16,
        what: impl Fn() -> String,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), KernelError> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = flags;
        let mut handle = self.handle.clone();
        let mut answers = handle
            .request(request)
            .map_err(|_| KernelError::Closed { what: what() })?;
        let mut collected = Vec::new();
        let mut interrupted = false;
        while let Some(answer) = answers.next().await {
            interrupted |= answer.header.flags & NLM_F_DUMP_INTR != 0;
            match answer.payload {
                NetlinkPayload::InnerMessage(inner) => collected.push(inner),
                NetlinkPayload::Error(error) if error.code.is_some() => {
                    return Err(KernelError::Netlink {
                        what: what(),
                        source: error.to_io(),
                    });
                }
                NetlinkPayload::Overrun(_) => {
                    return Err(KernelError::Netlink {
                        what: what(),
                        source: io::Error::other("netlink overrun: the kernel dropped answers"),
                    });
                }
                _ => {}
            }
        }
        Ok((collected, interrupted))
    }
}

/// Whether the probe's failure says the kernel has no resilient nexthop groups (`EOPNOTSUPP`: no nexthop
/// objects, Linux < 5.3; `EINVAL`: no resilient type or `NHA_RES_GROUP`, < 5.13; `EAFNOSUPPORT`), rather
/// than something to retry (`EPERM`, a closed socket, ...).
fn unsupported(error: &KernelError) -> bool {
    matches!(
        error,
        KernelError::Netlink { source, .. } if matches!(
            source.raw_os_error(),
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::EAFNOSUPPORT)
        )
    )
}

/// Writes `net.ipv4.fib_multipath_hash_policy=1` and `net.ipv6.fib_multipath_hash_policy=1` (multipath
/// routes and nexthop groups hash flows on their layer-4 ports, so one pod's flows spread over the gateways), and
/// `net.ipv4.conf.<device>.rp_filter=0` on the vxlan device, whose return traffic comes from the internet.
///
/// The sysctl key of a device with a '.' in its name spells it with '/' (`net.ipv4.conf.egress/calico`), but
/// the `/proc/sys` path uses the real name. The kernel applies the larger of `conf/all/rp_filter` and the
/// device's value: a node with `all` set to 1 or 2 still filters. A file is only written when its value
/// differs. A node without IPv6 (no `/proc/sys/net/ipv6`) skips the IPv6 key. Errors name the file.
pub(crate) fn set_sysctls(device: &str) -> Result<(), KernelError> {
    sysctl::set_sysctls_in(std::path::Path::new("/proc/sys"), device)
}
