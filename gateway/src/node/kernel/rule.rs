//! ip rules: `from SRC/32 lookup TABLE priority P proto 242` (or `/128`), the family the source's. The
//! messages that write them, reading them back from a dump, and the diff.
//!
//! Rules cannot be replaced in place; one that differs is a different rule: the old one is deleted (before
//! its table may empty) and the new one added (after its table is written).

use std::collections::BTreeSet;
use std::net::IpAddr;

use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::{NLM_F_CREATE, NLM_F_EXCL};

use super::route::header_table;
use super::{Change, Effect, KernelError};
use crate::node::state::{Ownership, RuleSpec, RTPROT_EGRESS};

/// The message that writes `spec` (for `RTM_NEWRULE`).
pub(super) fn message(spec: &RuleSpec) -> RuleMessage {
    let mut message = RuleMessage::default();
    let (family, length) = match spec.src {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    message.header.family = family;
    message.header.src_len = length;
    message.header.table = header_table(spec.table);
    message.header.action = RuleAction::ToTable;
    message.attributes = vec![
        RuleAttribute::Source(spec.src),
        RuleAttribute::Table(spec.table),
        RuleAttribute::Priority(spec.priority),
        RuleAttribute::Protocol(RouteProtocol::from(RTPROT_EGRESS)),
    ];
    message
}

/// The dump request: all rules of all families (a strict dump request may not filter rules).
pub(super) fn dump_request() -> RouteNetlinkMessage {
    RouteNetlinkMessage::GetRule(RuleMessage::default())
}

/// A rule the agent owns, as the kernel reported it.
#[derive(Debug, Clone)]
pub(super) struct Owned {
    /// The rule, if it has exactly the agent's form; `None` for one that also matches on something else (it
    /// is deleted).
    pub(super) spec: Option<RuleSpec>,
    /// The dump: sent back to delete it exactly.
    message: RuleMessage,
}

/// Protocol, priority and table of a reported rule.
fn identity(message: &RuleMessage) -> (u8, u32, u32) {
    let mut protocol = 0;
    let mut priority = 0;
    let mut table = u32::from(message.header.table);
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Protocol(p) => protocol = u8::from(*p),
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    (protocol, priority, table)
}

/// The [`RuleSpec`] of a reported rule that has exactly the agent's form.
fn spec(message: &RuleMessage) -> Option<RuleSpec> {
    let header = &message.header;
    if header.dst_len != 0
        || header.tos != 0
        || header.action != RuleAction::ToTable
        || header.flags.contains(RuleFlags::Invert)
    {
        return None;
    }
    let mut src = None;
    for attribute in &message.attributes {
        match attribute {
            RuleAttribute::Source(ip) => src = Some(*ip),
            // Unset, as the kernel reports it (it dumps FRA_SUPPRESS_PREFIXLEN -1 for every rule).
            RuleAttribute::FwMark(0)
            | RuleAttribute::FwMask(0)
            | RuleAttribute::L3MDev(false)
            | RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            RuleAttribute::Destination(_)
            | RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::Goto(_)
            | RuleAttribute::FwMark(_)
            | RuleAttribute::FwMask(_)
            | RuleAttribute::Realm(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::SuppressIfGroup(_)
            | RuleAttribute::SuppressPrefixLen(_)
            | RuleAttribute::L3MDev(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_) => return None,
            _ => {}
        }
    }
    let src = src?;
    let full = match (header.family, src) {
        (AddressFamily::Inet, IpAddr::V4(_)) => 32,
        (AddressFamily::Inet6, IpAddr::V6(_)) => 128,
        _ => return None,
    };
    if header.src_len != full {
        return None;
    }
    let (_, priority, table) = identity(message);
    Some(RuleSpec {
        src,
        table,
        priority,
    })
}

/// The rules in `dumped` that the agent owns: protocol [`RTPROT_EGRESS`], priority `owned.rule_priority`,
/// a table in `owned.tables`.
pub(super) fn owned(dumped: &[RouteNetlinkMessage], owned: &Ownership) -> Vec<Owned> {
    dumped
        .iter()
        .filter_map(|message| match message {
            RouteNetlinkMessage::NewRule(rule) => Some(rule),
            _ => None,
        })
        .filter(|rule| {
            matches!(
                rule.header.family,
                AddressFamily::Inet | AddressFamily::Inet6
            )
        })
        .filter(|rule| {
            let (protocol, priority, table) = identity(rule);
            protocol == RTPROT_EGRESS
                && priority == owned.rule_priority
                && owned.tables.contains(&table)
        })
        .map(|rule| Owned {
            spec: spec(rule),
            message: rule.clone(),
        })
        .collect()
}

/// The rule requests of one apply.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// Rules to add (last).
    pub(super) add: Vec<Change>,
    /// Rules to delete (first).
    pub(super) remove: Vec<Change>,
}

/// What turns the `observed` owned rules into `desired`.
pub(super) fn plan(
    observed: &[Owned],
    desired: &BTreeSet<RuleSpec>,
    owned: &Ownership,
) -> Result<Plan, KernelError> {
    for rule in desired {
        let invalid = |reason| KernelError::InvalidRule {
            src: rule.src,
            table: rule.table,
            priority: rule.priority,
            reason,
        };
        if rule.priority != owned.rule_priority {
            return Err(invalid("the priority is not the agent's"));
        }
        if !owned.tables.contains(&rule.table) {
            return Err(invalid("the table is outside the agent's tables"));
        }
    }
    let mut plan = Plan::default();
    let mut present = BTreeSet::new();
    for rule in observed {
        match rule.spec {
            Some(spec) if desired.contains(&spec) && present.insert(spec) => {}
            _ => plan.remove.push(Change {
                what: format!("delete rule {}", describe(&rule.message)),
                message: RouteNetlinkMessage::DelRule(rule.message.clone()).into(),
                flags: 0,
                effect: Effect::Removed,
                objects: 1,
                table: None,
            }),
        }
    }
    plan.add = desired
        .difference(&present)
        .map(|spec| Change {
            what: format!(
                "add rule from {} lookup {} priority {}",
                spec.src, spec.table, spec.priority
            ),
            message: RouteNetlinkMessage::NewRule(message(spec)).into(),
            flags: NLM_F_CREATE | NLM_F_EXCL,
            effect: Effect::Added,
            objects: 1,
            table: Some(spec.table),
        })
        .collect();
    Ok(plan)
}

/// `from SRC lookup TABLE priority P` for a reported rule.
fn describe(message: &RuleMessage) -> String {
    let (_, priority, table) = identity(message);
    let src = message.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(ip) => Some(format!("{ip}/{}", message.header.src_len)),
        _ => None,
    });
    format!(
        "from {} lookup {table} priority {priority}",
        src.as_deref().unwrap_or("all")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, Parseable};

    fn ownership() -> Ownership {
        Ownership {
            device: "egress.calico".into(),
            rule_priority: 100,
            tables: 300..=399,
            nexthops: crate::node::state::NEXTHOP_IDS,
        }
    }

    fn rule(src: &str, table: u32) -> RuleSpec {
        RuleSpec {
            src: src.parse().unwrap(),
            table,
            priority: 100,
        }
    }

    fn dumped(message: &RuleMessage) -> RouteNetlinkMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        let mut parsed = RuleMessage::parse(bytes.as_slice()).unwrap();
        if parsed.header.table == 0 {
            parsed.header.table = 252;
        }
        RouteNetlinkMessage::NewRule(parsed)
    }

    #[test]
    fn message_is_from_host_lookup_table_priority_protocol() {
        let m = message(&rule("10.0.1.1", 300));
        assert_eq!(m.header.family, AddressFamily::Inet);
        assert_eq!(m.header.src_len, 32);
        assert_eq!(m.header.action, RuleAction::ToTable);
        assert_eq!(m.header.table, 0, "300 goes in FRA_TABLE");
        assert!(m.attributes.contains(&RuleAttribute::Table(300)));
        assert!(m.attributes.contains(&RuleAttribute::Priority(100)));
        assert!(m
            .attributes
            .contains(&RuleAttribute::Protocol(RouteProtocol::Other(242))));
        let m = message(&rule("fd00::1:1", 200));
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!(m.header.src_len, 128);
        assert_eq!(m.header.table, 200);
    }

    #[test]
    fn written_rules_read_back_as_owned_specs() {
        for spec in [rule("10.0.1.1", 300), rule("fd00::1:1", 399)] {
            let found = owned(&[dumped(&message(&spec))], &ownership());
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].spec, Some(spec));
        }
    }

    /// As Linux 6.18 dumps `ip rule add from 10.1.0.0 lookup 1000 priority 100 proto 242`.
    #[test]
    fn a_kernel_dump_reads_as_the_spec() {
        let mut m = RuleMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.src_len = 32;
        m.header.table = 252;
        m.header.action = RuleAction::ToTable;
        m.attributes = vec![
            RuleAttribute::Table(1000),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
            RuleAttribute::Protocol(RouteProtocol::Other(242)),
            RuleAttribute::Priority(100),
            RuleAttribute::Source("10.1.0.0".parse().unwrap()),
        ];
        let ownership = Ownership {
            tables: 1000..=1999,
            ..ownership()
        };
        let found = owned(&[RouteNetlinkMessage::NewRule(m.clone())], &ownership);
        assert_eq!(found[0].spec, Some(rule("10.1.0.0", 1000)));
        // A real suppress_prefixlength makes it another rule.
        m.attributes[1] = RuleAttribute::SuppressPrefixLen(0);
        let found = owned(&[RouteNetlinkMessage::NewRule(m)], &ownership);
        assert_eq!(found[0].spec, None);
    }

    #[test]
    fn ownership_is_protocol_priority_and_table() {
        let mut other_priority = rule("10.0.1.1", 300);
        other_priority.priority = 200;
        let mut other_protocol = message(&rule("10.0.1.1", 300));
        other_protocol
            .attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        let dumps = [
            dumped(&message(&other_priority)),
            dumped(&other_protocol),
            dumped(&message(&rule("10.0.1.1", 500))),
        ];
        assert!(owned(&dumps, &ownership()).is_empty());
    }

    #[test]
    fn plan_deletes_first_and_adds_last() {
        let mut with_iif = message(&rule("10.0.1.3", 303));
        with_iif
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        let observed = owned(
            &[
                dumped(&message(&rule("10.0.1.1", 300))),
                dumped(&message(&rule("10.0.1.2", 301))),
                dumped(&with_iif),
            ],
            &ownership(),
        );
        assert_eq!(observed[2].spec, None, "an iif makes it another rule");
        let desired: BTreeSet<_> = [
            rule("10.0.1.1", 300),
            rule("10.0.1.3", 303),
            rule("fd00::1", 302),
        ]
        .into();
        let p = plan(&observed, &desired, &ownership()).unwrap();
        let removed: Vec<_> = p.remove.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            removed,
            [
                "delete rule from 10.0.1.2/32 lookup 301 priority 100",
                "delete rule from 10.0.1.3/32 lookup 303 priority 100"
            ]
        );
        let added: Vec<_> = p.add.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            added,
            [
                "add rule from 10.0.1.3 lookup 303 priority 100",
                "add rule from fd00::1 lookup 302 priority 100"
            ]
        );
        assert_eq!(p.add[0].table, Some(303));
    }

    #[test]
    fn duplicates_go_and_foreign_desired_rules_are_refused() {
        let one = dumped(&message(&rule("10.0.1.1", 300)));
        let observed = owned(&[one.clone(), one], &ownership());
        let desired: BTreeSet<_> = [rule("10.0.1.1", 300)].into();
        let p = plan(&observed, &desired, &ownership()).unwrap();
        assert_eq!((p.add.len(), p.remove.len()), (0, 1));

        let mut wrong = rule("10.0.1.1", 300);
        wrong.priority = 5;
        let e = plan(&[], &[wrong].into(), &ownership()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "rule from 10.0.1.1 lookup 300 priority 5: the priority is not the agent's"
        );
    }
}
