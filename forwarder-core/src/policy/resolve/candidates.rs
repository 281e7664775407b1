//! Which pods a gateway spec's selectors match, looked up once per (selector, namespace scope) and then
//! remembered for as long as the inventory is borrowed.
//!
//! The scope is the namespace selector when the spec has one, and otherwise the client's own namespace:
//! the only part of the answer that depends on the client. What stays per client — the client itself is
//! never its own gateway, the destination's address family, health, `PreferNodeLocal`, `maxNextHops` —
//! is the caller's ([`super::Resolver`]'s step 3).
//!
//! Why: without this, resolving every pod of a node walked every pod of the inventory for every client
//! pod and destination. `scripts/agent-scale.sh` measured the node agent's podIP → ip rule time growing
//! from a p99 of ~30 ms with 40 pods on the node to ~190–250 ms with 1,040, with a profile dominated by
//! string comparison, map walks and `selector::Expr::matches`; `cargo bench -p bench --bench policy`
//! measures the same work.

use std::collections::HashMap;
use std::rc::Rc;

use super::Inventory;
use crate::policy::model::{namespace_selector_labels, GatewaySpec, Pod};
use crate::policy::selector::Selector;

/// The pods a spec's selectors match, in the inventory's order (namespace, then name).
pub(super) type Matching<'a> = Rc<[&'a Pod]>;

/// The remembered answers, by gateway selector.
#[derive(Debug, Default)]
pub(super) struct Candidates<'a> {
    by_selector: HashMap<Selector, Scopes<'a>>,
}

/// The answers for one gateway selector.
#[derive(Debug, Default)]
struct Scopes<'a> {
    /// With a namespace selector: pods in every namespace it matches, by namespace selector.
    across: HashMap<Selector, Matching<'a>>,
    /// Without one: pods in the client's namespace, by that namespace.
    within: HashMap<String, Matching<'a>>,
}

impl<'a> Candidates<'a> {
    /// The pods of `inventory` that `spec`'s selectors match for a client in `client_namespace`. Every call
    /// for one `Candidates` must pass the same inventory.
    pub(super) fn matching(
        &mut self,
        inventory: &'a Inventory,
        spec: &GatewaySpec,
        client_namespace: &str,
    ) -> Matching<'a> {
        if let Some(found) = self.remembered(spec, client_namespace) {
            return found;
        }
        let found: Matching<'a> = match &spec.namespace_selector {
            Some(namespaces) => across(inventory, &spec.selector, namespaces),
            None => within(inventory, &spec.selector, client_namespace),
        };
        let scopes = self.by_selector.entry(spec.selector.clone()).or_default();
        match &spec.namespace_selector {
            Some(namespaces) => scopes.across.insert(namespaces.clone(), Rc::clone(&found)),
            None => scopes
                .within
                .insert(client_namespace.to_string(), Rc::clone(&found)),
        };
        found
    }

    fn remembered(&self, spec: &GatewaySpec, client_namespace: &str) -> Option<Matching<'a>> {
        let scopes = self.by_selector.get(&spec.selector)?;
        match &spec.namespace_selector {
            Some(namespaces) => scopes.across.get(namespaces),
            None => scopes.within.get(client_namespace),
        }
        .cloned()
    }
}

/// Pods matching `selector` in the namespaces matching `namespaces` (their labels plus
/// `projectcalico.org/name`; a namespace the inventory does not hold has only the latter).
fn across<'a>(
    inventory: &'a Inventory,
    selector: &Selector,
    namespaces: &Selector,
) -> Matching<'a> {
    // Pods come grouped by namespace: each namespace is matched once, when its first selected pod comes.
    let mut last: Option<(&str, bool)> = None;
    inventory
        .pods
        .values()
        .filter(|p| selector.matches(&p.labels))
        .filter(|p| match last {
            Some((ns, matched)) if ns == p.namespace => matched,
            _ => {
                let labels = inventory.namespaces.get(&p.namespace).map(|n| &n.labels);
                let matched = namespaces.matches(&namespace_selector_labels(&p.namespace, labels));
                last = Some((&p.namespace, matched));
                matched
            }
        })
        .collect()
}

/// Pods matching `selector` in namespace `namespace`: a range of the inventory's pods, which are keyed by
/// (namespace, name).
fn within<'a>(inventory: &'a Inventory, selector: &Selector, namespace: &str) -> Matching<'a> {
    inventory
        .pods
        .range((namespace.to_string(), String::new())..)
        .take_while(|((ns, _), _)| ns == namespace)
        .map(|(_, p)| p)
        .filter(|p| selector.matches(&p.labels))
        .collect()
}
