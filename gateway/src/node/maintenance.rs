//! Calico Enterprise's gateway maintenance annotations: when a gateway pod that a client pod's routes use
//! starts terminating (a graceful delete: `deletionTimestamp` set, the gateway draining), the agent of the
//! client's node annotates the client pod with the gateway's IP and when its termination started and will
//! finish, under Calico Enterprise's keys, so that applications can react (e.g. through the downward API);
//! and removes them when no gateway the pod uses is terminating any more. Calico Enterprise documents the
//! keys in "Optimize egress networking for workloads with long-lived TCP connections".

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use forwarder_core::policy::Labels;
use serde_json::{json, Map, Value};

use super::cluster::Terminating;
use super::desired::{Memory, PodKey};

/// The terminating gateway's IP.
pub(crate) const GATEWAY_IP: &str = "egress.projectcalico.org/gatewayMaintenanceGatewayIP";
/// When it started terminating (RFC 3339).
pub(crate) const STARTED: &str = "egress.projectcalico.org/gatewayMaintenanceStartedTimestamp";
/// When it will be gone (RFC 3339).
pub(crate) const FINISHED: &str = "egress.projectcalico.org/gatewayMaintenanceFinishedTimestamp";

/// A maintenance window one pod is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    /// The terminating gateway.
    pub(crate) gateway: Ipv4Addr,
    /// Its termination.
    pub(crate) when: Terminating,
}

/// For every pod the plan gave a table: the terminating gateway among those its routes use that finishes
/// first, or `None`.
pub(crate) fn windows(
    memory: &Memory,
    terminating: &BTreeMap<Ipv4Addr, Terminating>,
) -> BTreeMap<PodKey, Option<Window>> {
    memory
        .tables
        .iter()
        .map(|(pod, table)| {
            let window = memory
                .members
                .range((*table, ipnet::IpNet::default())..)
                .take_while(|((t, _), _)| t == table)
                .flat_map(|(_, gws)| gws)
                .filter_map(|gw| terminating.get(gw).map(|t| (gw, t)))
                .min_by(|a, b| (&a.1.finished, a.0).cmp(&(&b.1.finished, b.0)))
                .map(|(gw, t)| Window {
                    gateway: *gw,
                    when: t.clone(),
                });
            (pod.clone(), window)
        })
        .collect()
}

/// The JSON merge patch (RFC 7386) that makes `annotations` say `window`: the three keys set, or removed
/// (`null`); `None` when they already say it.
pub(crate) fn patch(annotations: &Labels, window: Option<&Window>) -> Option<Value> {
    let want: [(&str, Option<String>); 3] = match window {
        Some(w) => [
            (GATEWAY_IP, Some(w.gateway.to_string())),
            (STARTED, Some(w.when.started.clone())),
            (FINISHED, Some(w.when.finished.clone())),
        ],
        None => [(GATEWAY_IP, None), (STARTED, None), (FINISHED, None)],
    };
    let mut changes = Map::new();
    for (key, value) in want {
        if annotations.get(key) != value.as_ref() {
            changes.insert(key.to_string(), value.map_or(Value::Null, Value::String));
        }
    }
    (!changes.is_empty()).then(|| json!({ "metadata": { "annotations": changes } }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn when(finished: &str) -> Terminating {
        Terminating {
            started: "2026-12-04T08:00:00Z".into(),
            finished: finished.into(),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// Pod a (table 200) uses gateways .3 and .4 for the default route and .5 for 10/8; pod b (table 201)
    /// uses .6.
    fn memory() -> Memory {
        let mut m = Memory::default();
        m.tables.insert(("app".into(), "a".into()), 200);
        m.tables.insert(("app".into(), "b".into()), 201);
        let set = |l: &[&str]| l.iter().map(|s| ip(s)).collect::<BTreeSet<_>>();
        m.members.insert(
            (200, "0.0.0.0/0".parse().unwrap()),
            set(&["172.18.0.3", "172.18.0.4"]),
        );
        m.members
            .insert((200, "10.0.0.0/8".parse().unwrap()), set(&["172.18.0.5"]));
        m.members
            .insert((201, "0.0.0.0/0".parse().unwrap()), set(&["172.18.0.6"]));
        m
    }

    #[test]
    fn a_pod_is_in_the_window_of_the_first_of_its_gateways_to_go() {
        let mut term = BTreeMap::new();
        assert!(windows(&memory(), &term).values().all(Option::is_none));
        term.insert(ip("172.18.0.5"), when("2026-12-04T08:01:00Z"));
        term.insert(ip("172.18.0.4"), when("2026-12-04T08:00:30Z"));
        term.insert(ip("172.18.0.9"), when("2026-12-04T08:00:10Z"));
        let w = windows(&memory(), &term);
        let a = w[&("app".to_string(), "a".to_string())].as_ref().unwrap();
        assert_eq!(
            a.gateway,
            ip("172.18.0.4"),
            "finishes first among a's gateways"
        );
        assert_eq!(
            w[&("app".to_string(), "b".to_string())],
            None,
            ".9 is not b's"
        );
    }

    #[test]
    fn patches_set_change_and_remove_only_what_differs() {
        let w = Window {
            gateway: ip("172.18.0.4"),
            when: when("2026-12-04T08:00:30Z"),
        };
        let mut have = Labels::new();
        have.insert("other".into(), "kept".into());
        assert_eq!(patch(&have, None), None, "nothing to remove");
        let set = patch(&have, Some(&w)).unwrap();
        assert_eq!(
            set,
            json!({ "metadata": { "annotations": {
                GATEWAY_IP: "172.18.0.4",
                STARTED: "2026-12-04T08:00:00Z",
                FINISHED: "2026-12-04T08:00:30Z",
            }}})
        );
        have.insert(GATEWAY_IP.into(), "172.18.0.4".into());
        have.insert(STARTED.into(), "2026-12-04T08:00:00Z".into());
        have.insert(FINISHED.into(), "2026-12-04T08:00:30Z".into());
        assert_eq!(patch(&have, Some(&w)), None, "already there");
        let later = Window {
            when: when("2026-12-04T08:05:00Z"),
            ..w
        };
        assert_eq!(
            patch(&have, Some(&later)).unwrap(),
            json!({ "metadata": { "annotations": { FINISHED: "2026-12-04T08:05:00Z" } } })
        );
        assert_eq!(
            patch(&have, None).unwrap(),
            json!({ "metadata": { "annotations": { GATEWAY_IP: null, STARTED: null, FINISHED: null } } })
        );
    }
}
