//! Resilient nexthop groups for the routes via gateways: which member nexthops and groups the kernel should
//! hold, with which ids, and the requests that get it there. Pure: the input is what the kernel reported
//! and the desired routes, the output is the plan and, per route via gateways, the group it should use.
//!
//! * A **member** is one nexthop object per gateway and family: IPv4 `via <gateway pod IP> dev <vxlan>
//!   onlink`, IPv6 `via <link-local of its tunnel MAC> dev <vxlan>` — exactly a hop of the multipath
//!   route it replaces. An owned member with the same gateway, device and flags is adopted with its id.
//! * A **group** is `type resilient buckets 64 idle_timer 120 unbalanced_timer 0` over members of one
//!   family. Every route via gateways uses one, also a route via a single gateway: when a second replica
//!   comes, that group gains a member and only idle buckets move to it, where switching a plain `via` route
//!   to a new group would rehash every flow.
//! * A group's identity is the routes that use it, not its members: when every route on a group wants
//!   the same new set of gateways (a replica died, drains out, was added or came back), the group is
//!   **replaced in place** — one `NLM_F_REPLACE` whatever the number of pod tables, and the kernel moves
//!   only the buckets it must. So two groups may end with the same members (each keeps its own bucket
//!   table; merging them would move flows). A route that wants a set its group does not get (a new route,
//!   or one whose routes diverged, e.g. a pod added while a gateway drains) moves to a group that will
//!   have exactly its set — the lowest id among those — or to a new group, one per distinct set.
//! * Ids come from the agent's range ([`Ownership::nexthops`]): the lowest id no nexthop in the namespace
//!   has (the agent's or anyone's), except the two at the top of the range, which the start-up probe uses.
//!   An id stays with its object as long as the object exists, across agent restarts.
//!
//! Owned — and so replaced or deleted — are only nexthops with protocol [`RTPROT_EGRESS`] and an id in the
//! range. Groups that cannot be replaced into what the agent wants (hash-threshold, another bucket count)
//! lose their routes and are deleted, like members and groups nothing uses any more.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::ops::RangeInclusive;

use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

use super::nexthop::{Entry, Kind, Nexthop, Request, RESILIENT};
use super::route::{Hop, Shape};
use super::{Change, Effect, Message};
use crate::node::state::{Ownership, RouteKey, RTPROT_EGRESS};

/// The ids of the start-up probe's member and group: the top two of the range.
pub(super) fn probe_ids(range: &RangeInclusive<u32>) -> (u32, u32) {
    let member = *range.end();
    (member, member.saturating_sub(1))
}

/// The nexthops in `dumped` that the agent owns: protocol [`RTPROT_EGRESS`], id in `owned.nexthops`.
pub(super) fn owned(dumped: &[Nexthop], owned: &Ownership) -> Vec<Nexthop> {
    dumped
        .iter()
        .filter(|n| n.protocol == RTPROT_EGRESS && owned.nexthops.contains(&n.id))
        .cloned()
        .collect()
}

/// What the routes should point at, and the nexthop requests of one apply, in the order they go.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Per route via gateways, the group it should use.
    pub(super) routes: BTreeMap<RouteKey, u32>,
    /// New members (before the groups that use them).
    pub(super) add_members: Vec<Change>,
    /// New groups and groups whose members change (before the routes that use them).
    pub(super) upsert_groups: Vec<Change>,
    /// Groups no route uses any more (after the routes moved off).
    pub(super) remove_groups: Vec<Change>,
    /// Members no group uses any more, and owned nexthops of other kinds (last).
    pub(super) remove_members: Vec<Change>,
}

/// A member as compared: its gateway (which says the family), device and `onlink`.
type MemberKey = (IpAddr, u32, bool);

/// A set of members of one family, sorted.
type Set = Vec<MemberKey>;

/// Plans the nexthops for `desired` routes (their shapes as [`Shape::desired`] gives them), given the
/// owned nexthops the kernel holds (`observed`), the ids every nexthop of the namespace uses (`taken`), and
/// the group each route uses now (`current`: owned routes with [`Shape::Group`]).
pub(super) fn plan(
    observed: &[Nexthop],
    taken: &BTreeSet<u32>,
    desired: &BTreeMap<RouteKey, Shape>,
    current: &BTreeMap<RouteKey, u32>,
    range: &RangeInclusive<u32>,
) -> Plan {
    let mut ids = Ids::new(taken, range);
    let mut plan = Plan::default();

    // Members: adopt owned ones by content (the lowest id of duplicates), create the missing.
    let mut members: BTreeMap<MemberKey, u32> = BTreeMap::new();
    let mut member_of: BTreeMap<u32, MemberKey> = BTreeMap::new();
    let mut groups: BTreeMap<u32, (Option<Set>, bool)> = BTreeMap::new();
    let mut unusable: Vec<&Nexthop> = Vec::new();
    for nexthop in observed {
        match &nexthop.kind {
            Kind::Member {
                gateway,
                device,
                onlink,
            } => {
                let key = (*gateway, *device, *onlink);
                member_of.insert(nexthop.id, key);
                members.entry(key).or_insert(nexthop.id);
            }
            Kind::Group { .. } | Kind::Other => {}
        }
    }
    for nexthop in observed {
        match &nexthop.kind {
            Kind::Group {
                entries,
                resilient: Some(r),
            } if r.buckets == RESILIENT.buckets => {
                // The members it has, if they are all owned members of one family with weight 1.
                let set: Option<Set> = entries
                    .iter()
                    .map(|e| member_of.get(&e.id).copied().filter(|_| e.weight == 1))
                    .collect::<Option<BTreeSet<_>>>()
                    .map(|s| s.into_iter().collect::<Set>())
                    .filter(one_family);
                let exact = *r == RESILIENT;
                groups.insert(nexthop.id, (set, exact));
            }
            Kind::Group { .. } | Kind::Other => unusable.push(nexthop),
            Kind::Member { .. } => {}
        }
    }

    // The set each route wants.
    let wants: BTreeMap<RouteKey, Set> = desired
        .iter()
        .filter_map(|(key, shape)| match shape {
            Shape::Via(hops) => Some((*key, hops.iter().map(member_key).collect())),
            _ => None,
        })
        .collect();

    // Groups keep the routes on them whose set they will have: their current set if any of their routes
    // still wants it, else the set most of their routes want (ties: the smaller set).
    let mut on_group: BTreeMap<u32, Vec<&RouteKey>> = BTreeMap::new();
    for key in wants.keys() {
        if let Some(&g) = current.get(key).filter(|g| groups.contains_key(g)) {
            on_group.entry(g).or_default().push(key);
        }
    }
    let mut finals: BTreeMap<u32, Set> = BTreeMap::new();
    for (&g, keys) in &on_group {
        let now = groups.get(&g).and_then(|(set, _)| set.as_ref());
        let family = now.and_then(|s| s.first()).map(|m| m.0.is_ipv4());
        let mut votes: BTreeMap<&Set, usize> = BTreeMap::new();
        for key in keys {
            let want = &wants[*key];
            // A group's members stay of one family: routes of the other family leave it.
            if family.is_none_or(|f| want.first().is_some_and(|m| m.0.is_ipv4() == f)) {
                *votes.entry(want).or_default() += 1;
            }
        }
        let chosen = match now {
            Some(now) if votes.contains_key(now) => Some(now.clone()),
            _ => votes
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(set, _)| (*set).clone()),
        };
        if let Some(set) = chosen {
            finals.insert(g, set);
        }
    }

    // Every route: its own group if that group ends with its set, else the lowest group that does, else
    // a new one per set.
    let mut by_set: BTreeMap<Set, u32> = BTreeMap::new();
    for (&g, set) in &finals {
        by_set.entry(set.clone()).or_insert(g);
    }
    let mut created: Vec<(u32, Set)> = Vec::new();
    for (key, want) in &wants {
        let mine = current
            .get(key)
            .filter(|g| finals.get(g) == Some(want))
            .copied();
        let group = match mine.or_else(|| by_set.get(want).copied()) {
            Some(g) => g,
            None => {
                let Some(g) = ids.next() else {
                    // The range is full: leave the route out; [`route::plan`] writes it as multipath.
                    continue;
                };
                by_set.insert(want.clone(), g);
                created.push((g, want.clone()));
                g
            }
        };
        plan.routes.insert(*key, group);
    }

    // Members the final groups need.
    let needed: BTreeSet<MemberKey> = finals
        .values()
        .chain(created.iter().map(|(_, s)| s))
        .flatten()
        .copied()
        .collect();
    for key in &needed {
        if !members.contains_key(key) {
            let Some(id) = ids.next() else { continue };
            members.insert(*key, id);
            if let Some(request) = member(id, key) {
                plan.add_members.push(change(
                    format!("add nexthop {id} {}", describe_member(key)),
                    request,
                    NLM_F_CREATE | NLM_F_EXCL,
                    Effect::Added,
                ));
            }
        }
    }

    // Groups: replace those whose members or timers change, create the new ones.
    let used: BTreeSet<u32> = plan.routes.values().copied().collect();
    for (&g, set) in &finals {
        if !used.contains(&g) {
            continue;
        }
        let (now, exact) = &groups[&g];
        if now.as_ref() != Some(set) || !exact {
            if let Some(message) = group(g, set, &members) {
                plan.upsert_groups.push(change(
                    format!("replace nexthop group {g} with {}", describe_set(set)),
                    message,
                    NLM_F_CREATE | NLM_F_REPLACE,
                    Effect::Replaced,
                ));
            }
        }
    }
    for (g, set) in &created {
        if let Some(message) = group(*g, set, &members) {
            plan.upsert_groups.push(change(
                format!("add nexthop group {g} of {}", describe_set(set)),
                message,
                NLM_F_CREATE | NLM_F_EXCL,
                Effect::Added,
            ));
        }
    }

    // Deletions: groups nothing uses, then other owned nexthops, then members no group uses.
    for &g in groups.keys() {
        if !used.contains(&g) {
            plan.remove_groups.push(delete(g, "group"));
        }
    }
    for nexthop in unusable {
        plan.remove_groups.push(delete(nexthop.id, "object"));
    }
    let kept: BTreeSet<u32> = needed
        .iter()
        .filter_map(|k| members.get(k))
        .copied()
        .collect();
    for &id in member_of.keys() {
        if !kept.contains(&id) {
            plan.remove_members.push(delete(id, "member"));
        }
    }
    plan
}

/// Free ids of the range, lowest first.
struct Ids<'a> {
    taken: &'a BTreeSet<u32>,
    next: u32,
    last: u32,
    given: BTreeSet<u32>,
}

impl<'a> Ids<'a> {
    fn new(taken: &'a BTreeSet<u32>, range: &RangeInclusive<u32>) -> Self {
        let (_, probe_group) = probe_ids(range);
        Ids {
            taken,
            next: (*range.start()).max(1),
            // Below the probe's two ids.
            last: probe_group.saturating_sub(1),
            given: BTreeSet::new(),
        }
    }

    fn next(&mut self) -> Option<u32> {
        while self.next <= self.last {
            let id = self.next;
            self.next = self.next.checked_add(1)?;
            if !self.taken.contains(&id) && self.given.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

fn member_key(hop: &Hop) -> MemberKey {
    (hop.gateway, hop.device, hop.onlink)
}

fn one_family(set: &Set) -> bool {
    set.windows(2).all(|w| w[0].0.is_ipv4() == w[1].0.is_ipv4()) && !set.is_empty()
}

fn member(id: u32, key: &MemberKey) -> Option<Request> {
    let (gateway, device, onlink) = *key;
    let nexthop = Nexthop {
        id,
        protocol: RTPROT_EGRESS,
        kind: Kind::Member {
            gateway,
            device,
            onlink,
        },
    };
    Request::new(&nexthop)
}

fn group(id: u32, set: &Set, members: &BTreeMap<MemberKey, u32>) -> Option<Request> {
    let entries = set
        .iter()
        .map(|key| members.get(key).map(|&id| Entry { id, weight: 1 }))
        .collect::<Option<Vec<_>>>()?;
    Request::new(&Nexthop {
        id,
        protocol: RTPROT_EGRESS,
        kind: Kind::Group {
            entries,
            resilient: Some(RESILIENT),
        },
    })
}

fn change(what: String, request: Request, flags: u16, effect: Effect) -> Change {
    Change {
        what,
        message: Message::Nexthop(request),
        flags,
        effect,
        objects: 1,
        table: None,
    }
}

fn delete(id: u32, what: &str) -> Change {
    change(
        format!("delete nexthop {what} {id}"),
        Request::delete(id),
        0,
        Effect::Removed,
    )
}

fn describe_member(key: &MemberKey) -> String {
    let (gateway, device, onlink) = key;
    format!(
        "via {gateway} dev {device}{}",
        if *onlink { " onlink" } else { "" }
    )
}

fn describe_set(set: &Set) -> String {
    set.iter()
        .map(|(gateway, _, _)| gateway.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The groups the owned routes use now: routes at the agent's own key (`primary`) that point at a group.
pub(super) fn current(routes: &[super::route::Owned]) -> BTreeMap<RouteKey, u32> {
    routes
        .iter()
        .filter(|r| r.primary)
        .filter_map(|r| match r.shape {
            Shape::Group(id) => Some((r.key, id)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::state::NEXTHOP_IDS;
    use ipnet::IpNet;

    const DEV: u32 = 9;

    fn gw(last: u8) -> IpAddr {
        IpAddr::from([10, 244, 0, last])
    }

    fn key(table: u32) -> RouteKey {
        (table, IpNet::V4(ipnet::Ipv4Net::default()))
    }

    fn via(gateways: &[u8]) -> Shape {
        Shape::Via(
            gateways
                .iter()
                .map(|&g| Hop {
                    gateway: gw(g),
                    device: DEV,
                    onlink: true,
                    weight: 0,
                })
                .collect(),
        )
    }

    fn id(n: u32) -> u32 {
        NEXTHOP_IDS.start() + n
    }

    fn member(n: u32, g: u8) -> Nexthop {
        Nexthop {
            id: id(n),
            protocol: RTPROT_EGRESS,
            kind: Kind::Member {
                gateway: gw(g),
                device: DEV,
                onlink: true,
            },
        }
    }

    fn group(n: u32, members: &[u32]) -> Nexthop {
        Nexthop {
            id: id(n),
            protocol: RTPROT_EGRESS,
            kind: Kind::Group {
                entries: members
                    .iter()
                    .map(|&m| Entry {
                        id: id(m),
                        weight: 1,
                    })
                    .collect(),
                resilient: Some(RESILIENT),
            },
        }
    }

    fn whats(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                c.what
                    .split(' ')
                    .map(|w| match w.parse::<u32>() {
                        Ok(n) if n >= *NEXTHOP_IDS.start() => {
                            format!("#{}", n - NEXTHOP_IDS.start())
                        }
                        _ => w.to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    /// Three replicas a, b, c (members 0, 1, 2) in group 10, used by tables 300 and 301.
    fn three() -> (Vec<Nexthop>, BTreeSet<u32>, BTreeMap<RouteKey, u32>) {
        let observed = vec![
            member(0, 1),
            member(1, 2),
            member(2, 3),
            group(10, &[0, 1, 2]),
        ];
        let taken = observed.iter().map(|n| n.id).collect();
        let current = [(key(300), id(10)), (key(301), id(10))].into();
        (observed, taken, current)
    }

    #[test]
    fn a_replica_leaving_is_one_replace_of_the_group_and_the_routes_stay() {
        let (observed, taken, current) = three();
        let desired = [(key(300), via(&[1, 2])), (key(301), via(&[1, 2]))].into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes, current, "the routes keep their group");
        assert!(p.add_members.is_empty());
        assert_eq!(
            whats(&p.upsert_groups),
            ["replace nexthop group #10 with 10.244.0.1,10.244.0.2"]
        );
        assert_eq!(p.upsert_groups[0].flags, NLM_F_CREATE | NLM_F_REPLACE);
        assert!(p.remove_groups.is_empty());
        assert_eq!(whats(&p.remove_members), ["delete nexthop member #2"]);
    }

    #[test]
    fn a_replica_added_joins_the_group_in_place_after_its_member_is_made() {
        let (observed, taken, current) = three();
        let desired = [
            (key(300), via(&[1, 2, 3, 4])),
            (key(301), via(&[1, 2, 3, 4])),
        ]
        .into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes, current);
        assert_eq!(
            whats(&p.add_members),
            ["add nexthop #3 via 10.244.0.4 dev 9 onlink"]
        );
        assert_eq!(p.add_members[0].flags, NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!(
            whats(&p.upsert_groups),
            ["replace nexthop group #10 with 10.244.0.1,10.244.0.2,10.244.0.3,10.244.0.4"]
        );
    }

    #[test]
    fn unchanged_state_needs_nothing_and_a_restart_adopts_it() {
        let (observed, taken, current) = three();
        let desired = [(key(300), via(&[1, 2, 3])), (key(301), via(&[1, 2, 3]))].into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes, current);
        assert!(p.add_members.is_empty() && p.upsert_groups.is_empty());
        assert!(p.remove_groups.is_empty() && p.remove_members.is_empty());
    }

    #[test]
    fn diverging_routes_leave_the_group_for_one_of_their_own() {
        // A draining gateway: table 300 keeps c, a new pod's table 302 does not get it.
        let (observed, taken, current) = three();
        let desired = [
            (key(300), via(&[1, 2, 3])),
            (key(301), via(&[1, 2, 3])),
            (key(302), via(&[1, 2])),
        ]
        .into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes[&key(300)], id(10));
        assert_eq!(p.routes[&key(302)], id(3), "the lowest free id");
        assert_eq!(
            whats(&p.upsert_groups),
            ["add nexthop group #3 of 10.244.0.1,10.244.0.2"]
        );
        // Two routes wanting different sets, neither the current one: the majority keeps the group.
        let desired = [
            (key(300), via(&[1])),
            (key(301), via(&[1, 2])),
            (key(302), via(&[1, 2])),
        ]
        .into();
        let current = [(key(300), id(10)), (key(301), id(10)), (key(302), id(10))].into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes[&key(301)], id(10));
        assert_eq!(p.routes[&key(302)], id(10));
        assert_eq!(p.routes[&key(300)], id(3));
    }

    #[test]
    fn new_routes_share_a_group_per_set_and_unused_ones_go_last() {
        let mut observed = vec![member(0, 1), group(10, &[0])];
        // A hash-threshold group of the agent's, and someone else's nexthop in the range.
        observed.push(Nexthop {
            id: id(11),
            protocol: RTPROT_EGRESS,
            kind: Kind::Group {
                entries: vec![Entry {
                    id: id(0),
                    weight: 1,
                }],
                resilient: None,
            },
        });
        let mut taken: BTreeSet<u32> = observed.iter().map(|n| n.id).collect();
        taken.insert(id(1));
        let desired = [
            (key(300), via(&[2, 3])),
            (key(301), via(&[2, 3])),
            (key(302), Shape::Throw),
        ]
        .into();
        let current = [(key(300), id(11))].into();
        let p = plan(&observed, &taken, &desired, &current, &NEXTHOP_IDS);
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[&key(300)], id(2));
        assert_eq!(p.routes[&key(301)], id(2));
        assert_eq!(
            whats(&p.add_members),
            [
                "add nexthop #3 via 10.244.0.2 dev 9 onlink",
                "add nexthop #4 via 10.244.0.3 dev 9 onlink"
            ]
        );
        assert_eq!(
            whats(&p.upsert_groups),
            ["add nexthop group #2 of 10.244.0.2,10.244.0.3"]
        );
        assert_eq!(
            whats(&p.remove_groups),
            ["delete nexthop group #10", "delete nexthop object #11"]
        );
        assert_eq!(whats(&p.remove_members), ["delete nexthop member #0"]);
    }

    #[test]
    fn ownership_is_protocol_and_range_and_the_probe_ids_are_never_given() {
        let mut theirs = member(0, 1);
        theirs.protocol = 4;
        let mut outside = member(0, 1);
        outside.id = 7;
        let ours = member(1, 1);
        let owned_ones = owned(
            &[theirs, outside, ours.clone()],
            &Ownership {
                device: "egress.calico".into(),
                rule_priority: 100,
                tables: 300..=399,
                nexthops: NEXTHOP_IDS,
            },
        );
        assert_eq!(owned_ones, [ours]);
        let range = 10..=13;
        assert_eq!(probe_ids(&range), (13, 12));
        let taken = BTreeSet::new();
        let mut ids = Ids::new(&taken, &range);
        assert_eq!(
            (ids.next(), ids.next(), ids.next()),
            (Some(10), Some(11), None)
        );
    }
}
