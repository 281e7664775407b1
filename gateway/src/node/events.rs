//! Kubernetes Events for what someone must fix: a pod on this node whose egress traffic is blocked by a
//! configuration error (`EgressBlocked`, on the pod), and the invalid EgressGatewayPolicy behind it
//! (`InvalidPolicy`, on the policy). `kubectl describe` shows them on the object, next to the kubelet's.
//!
//! Only pods that are blocked report, so the Events scale with the mistakes on this node, not with the
//! cluster: an invalid policy nobody on this node names costs this agent nothing (its log and the
//! `egress_node_invalid_policies` gauge still say it). Each Event is published once per distinct note, and
//! again every [`REFRESH`] while the problem lasts (the API server drops Events after `--event-ttl`, one hour
//! by default), or after [`RETRY`] when the API server refused it. Publishing runs on its own task: a slow or
//! refusing API server never holds up routing.
//!
//! Events use the `events.k8s.io/v1` API through kube-rs's [`Recorder`], which needs `create` and `patch` on
//! `events.events.k8s.io` (deploy/node-agent/rbac.yaml).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forwarder_core::policy::BlockReason;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::cluster::ClusterView;
use super::desired::PodKey;

/// `reportingController` of every Event the agent publishes.
pub(crate) const CONTROLLER: &str = "egress-gateway/node-agent";

/// How often an Event is published again while its problem lasts: half the API server's default
/// `--event-ttl` (1 h), so `kubectl describe` never loses it.
pub(crate) const REFRESH: Duration = Duration::from_secs(30 * 60);

/// The longest note the API accepts (`events.k8s.io/v1`: 1 kB).
const NOTE_MAX: usize = 1024;

/// What an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Subject {
    /// A pod on this node, by namespace and name.
    Pod(String, String),
    /// An EgressGatewayPolicy, by name.
    Policy(String),
}

/// One Event the agent wants shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Report {
    /// What it is about.
    pub(crate) subject: Subject,
    /// The object's `metadata.uid`.
    pub(crate) uid: String,
    /// `EgressBlocked` or `InvalidPolicy`.
    pub(crate) reason: &'static str,
    /// What is wrong, for a human.
    pub(crate) note: String,
}

impl Report {
    fn reference(&self) -> ObjectReference {
        let (api_version, kind, namespace, name) = match &self.subject {
            Subject::Pod(ns, name) => ("v1", "Pod", Some(ns.clone()), name.clone()),
            Subject::Policy(name) => (
                "projectcalico.org/v3",
                "EgressGatewayPolicy",
                None,
                name.clone(),
            ),
        };
        ObjectReference {
            api_version: Some(api_version.to_string()),
            kind: Some(kind.to_string()),
            namespace,
            name: Some(name),
            uid: Some(self.uid.clone()),
            ..ObjectReference::default()
        }
    }
}

/// The Events a plan calls for (pure): one per blocked pod of the cluster (pods from input files have no
/// object to report on), and one per invalid policy that such a pod names.
pub(crate) fn reports(
    misconfigured: &BTreeMap<PodKey, Vec<BlockReason>>,
    view: &ClusterView,
    node: &str,
) -> Vec<Report> {
    let mut out = Vec::new();
    let mut policies: BTreeMap<String, Report> = BTreeMap::new();
    for (key, reasons) in misconfigured {
        let Some((_, uid)) = view.node_pod_uid(key) else {
            continue;
        };
        let mut why: Vec<String> = Vec::new();
        for reason in reasons {
            match reason {
                BlockReason::MissingPolicy { policy } => match view.invalid_policy(policy) {
                    Some((problem, policy_uid)) => {
                        why.push(format!(
                            "EgressGatewayPolicy '{policy}' is invalid: {problem}"
                        ));
                        policies.entry(policy.clone()).or_insert_with(|| Report {
                            subject: Subject::Policy(policy.clone()),
                            uid: policy_uid.to_string(),
                            reason: "InvalidPolicy",
                            note: clip(format!(
                                "not used by the egress node agent on {node}; its pods that name this \
                                 policy are blocked until it is fixed: {problem}"
                            )),
                        });
                    }
                    None => why.push(reason.to_string()),
                },
                _ => why.push(reason.to_string()),
            }
        }
        out.push(Report {
            subject: Subject::Pod(key.0.clone(), key.1.clone()),
            uid: uid.to_string(),
            reason: "EgressBlocked",
            note: clip(format!(
                "egress traffic blocked (fail closed) by the egress node agent on {node}: {}",
                why.join("; ")
            )),
        });
    }
    out.extend(policies.into_values());
    out
}

/// `note` cut to what the API accepts, at a character boundary.
fn clip(mut note: String) -> String {
    if note.len() > NOTE_MAX {
        let mut end = NOTE_MAX - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

/// Publishes [`Report`]s as Events, each once per note and again every [`REFRESH`]; one the API server
/// refused or did not take is tried again after [`RETRY`]. Each publication is a new Event: a [`Recorder`]
/// kept across them would turn a changed note into a repeat of the old one (it deduplicates by subject and
/// reason, and keeps the first note).
pub(crate) struct Publisher {
    client: kube::Client,
    reporter: Reporter,
    /// What was last published (or tried) per subject, and when it is due again. Shared with the
    /// publishing tasks, which move a failed one's time forward.
    sent: Arc<Mutex<BTreeMap<Subject, Sent>>>,
}

/// One subject's last publication.
#[derive(Debug)]
struct Sent {
    note: String,
    due: Instant,
}

/// How long after a failed publication it is tried again.
pub(crate) const RETRY: Duration = Duration::from_secs(60);

impl Publisher {
    /// A publisher reporting as [`CONTROLLER`], instance `node`.
    pub(crate) fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER.to_string(),
            instance: Some(node.to_string()),
        };
        Self {
            client,
            reporter,
            sent: Arc::default(),
        }
    }

    /// Publishes what is new, changed or due; forgets the subjects no longer reported, so a problem that
    /// comes back is reported again.
    pub(crate) fn publish(&mut self, reports: Vec<Report>) {
        let wanted: BTreeMap<Subject, Report> = reports
            .into_iter()
            .map(|r| (r.subject.clone(), r))
            .collect();
        let mut sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        sent.retain(|s, _| wanted.contains_key(s));
        let now = Instant::now();
        for (subject, report) in wanted {
            if sent
                .get(&subject)
                .is_some_and(|s| s.note == report.note && now < s.due)
            {
                continue;
            }
            sent.insert(
                subject,
                Sent {
                    note: report.note.clone(),
                    due: now + REFRESH,
                },
            );
            let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
            let sent = Arc::clone(&self.sent);
            tokio::spawn(async move {
                let event = Event {
                    type_: EventType::Warning,
                    reason: report.reason.to_string(),
                    note: Some(report.note.clone()),
                    action: "Route".to_string(),
                    secondary: None,
                };
                match recorder.publish(&event, &report.reference()).await {
                    Ok(()) => {
                        metrics::counter!("egress_node_events_total", "reason" => report.reason)
                            .increment(1);
                    }
                    Err(e) => {
                        metrics::counter!("egress_node_event_errors_total").increment(1);
                        tracing::warn!(
                            about = ?report.subject,
                            error = %e,
                            "cannot publish a Kubernetes Event (the agent needs `create` and `patch` on \
                             events.events.k8s.io); the problem is still logged; trying again in {} s",
                            RETRY.as_secs()
                        );
                        let mut sent = sent
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        if let Some(s) = sent.get_mut(&report.subject) {
                            if s.note == report.note {
                                s.due = Instant::now() + RETRY;
                            }
                        }
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::cluster::{self, Change, Update, Watch};
    use crate::node::desired::{self, Health, Memory, Settings};
    use serde_json::json;

    fn listed(watch: Watch, objects: Vec<(String, Option<cluster::Object>)>) -> Update {
        let objects = objects
            .into_iter()
            .filter_map(|(k, o)| o.map(|o| (k, o)))
            .collect();
        Update {
            watch,
            change: Change::Listed(objects),
        }
    }

    fn client(name: &str, ip: &str, uid: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "app", "uid": uid },
            "spec": { "nodeName": "node-a", "containers": [] },
            "status": { "phase": "Running", "podIP": ip }
        }))
        .expect("a pod")
    }

    /// Node-a's view: app/web names the invalid policy `broken`, app/lost a policy that does not exist,
    /// app/fine a valid one; the namespace opts nobody in.
    fn view() -> ClusterView {
        let mut view = ClusterView::default();
        let mut pods = Vec::new();
        for (name, ip, policy) in [
            ("web", "10.244.1.5", "broken"),
            ("lost", "10.244.1.6", "nowhere"),
            ("fine", "10.244.1.7", "good"),
        ] {
            let mut p = client(name, ip, &format!("uid-{name}"));
            p.metadata.annotations = Some(
                [(
                    "egress.projectcalico.org/egressGatewayPolicy".to_string(),
                    policy.to_string(),
                )]
                .into(),
            );
            pods.push(cluster::pod(&p));
        }
        view.apply(listed(Watch::NodePods, pods));
        view.apply(listed(Watch::GatewayPods, Vec::new()));
        let app: kube::api::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace> =
            serde_json::from_value(json!({ "metadata": { "name": "app" } })).expect("a namespace");
        view.apply(listed(Watch::Namespaces, vec![cluster::namespace(&app)]));
        let policy = |name: &str, selector: &str| -> kube::api::DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "projectcalico.org/v3", "kind": "EgressGatewayPolicy",
                "metadata": { "name": name, "uid": format!("uid-{name}") },
                "spec": { "rules": [ { "gateway": { "selector": selector } } ] }
            }))
            .expect("a policy")
        };
        view.apply(listed(
            Watch::Policies,
            vec![
                cluster::policy(&policy("broken", "egress-code == ")),
                cluster::policy(&policy("good", "egress-code == 'red'")),
            ],
        ));
        view
    }

    /// A publication the API server does not take is due again after RETRY, not after REFRESH; an
    /// unchanged report is not sent again before then, a changed one is.
    #[test]
    fn a_failed_publication_is_tried_again_soon() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Nothing listens on port 1 of loopback: every request is refused.
            let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
            let client = kube::Client::try_from(config).unwrap();
            let mut publisher = Publisher::new(client, "node-a");
            let report = |note: &str| Report {
                subject: Subject::Pod("app".into(), "web".into()),
                uid: "uid-web".into(),
                reason: "EgressBlocked",
                note: note.into(),
            };
            let due = |p: &Publisher| {
                let sent = p.sent.lock().unwrap();
                sent.values().next().map(|s| (s.note.clone(), s.due))
            };
            let start = Instant::now();
            publisher.publish(vec![report("one")]);
            let (_, first) = due(&publisher).expect("recorded");
            assert!(
                first >= start + REFRESH,
                "due after a refresh while in flight"
            );
            // The task fails (connection refused) and moves the time forward to a retry.
            let deadline = Instant::now() + Duration::from_secs(10);
            while due(&publisher).is_some_and(|(_, d)| d == first) {
                assert!(
                    Instant::now() < deadline,
                    "the failed publication never came back"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (note, retry) = due(&publisher).expect("still recorded");
            assert_eq!(note, "one");
            assert!(
                retry < start + REFRESH && retry >= start + RETRY,
                "{:?}",
                retry - start
            );
            // The same report is not sent again before then; a changed one is.
            publisher.publish(vec![report("one")]);
            assert_eq!(due(&publisher).map(|(_, d)| d), Some(retry));
            publisher.publish(vec![report("two")]);
            assert_eq!(due(&publisher).map(|(n, _)| n).as_deref(), Some("two"));
            // A subject no longer reported is forgotten.
            publisher.publish(Vec::new());
            assert!(due(&publisher).is_none());
        });
    }

    #[test]
    fn blocked_pods_and_the_invalid_policy_behind_them_are_reported() {
        let view = view();
        let inventory = view.inventory(&forwarder_core::policy::Inventory::new());
        let settings = Settings {
            node: "node-a",
            rule_priority: 100,
            tables: 1000..=1100,
            cluster_cidrs: &[],
        };
        let plan = desired::plan(
            &inventory,
            &settings,
            &|_| Health::Healthy,
            &Memory::default(),
        );
        let reports = reports(&plan.misconfigured, &view, "node-a");
        let subjects: Vec<(&Subject, &str, &str)> = reports
            .iter()
            .map(|r| (&r.subject, r.uid.as_str(), r.reason))
            .collect();
        assert_eq!(
            subjects,
            [
                (
                    &Subject::Pod("app".into(), "lost".into()),
                    "uid-lost",
                    "EgressBlocked"
                ),
                (
                    &Subject::Pod("app".into(), "web".into()),
                    "uid-web",
                    "EgressBlocked"
                ),
                (
                    &Subject::Policy("broken".into()),
                    "uid-broken",
                    "InvalidPolicy"
                ),
            ],
            "{reports:#?}"
        );
        let note = |s: &Subject| {
            reports
                .iter()
                .find(|r| r.subject == *s)
                .map(|r| r.note.clone())
        };
        let web = note(&Subject::Pod("app".into(), "web".into())).unwrap_or_default();
        assert!(
            web.contains("node-a") && web.contains("EgressGatewayPolicy 'broken' is invalid"),
            "{web}"
        );
        let lost = note(&Subject::Pod("app".into(), "lost".into())).unwrap_or_default();
        assert!(lost.contains("'nowhere' does not exist"), "{lost}");
        let reference = reports[2].reference();
        assert_eq!(reference.kind.as_deref(), Some("EgressGatewayPolicy"));
        assert_eq!(reference.namespace, None);
        assert_eq!(reference.uid.as_deref(), Some("uid-broken"));
    }

    #[test]
    fn clip_keeps_short_notes_and_cuts_long_ones_at_a_character() {
        assert_eq!(clip("short".to_string()), "short");
        let long = "é".repeat(NOTE_MAX);
        let cut = clip(long);
        assert!(cut.len() <= NOTE_MAX, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
