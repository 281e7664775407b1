//! The policy engine: which egress gateways (if any) carry a pod's traffic to a destination.
//!
//! Inputs are typed values (YAML belongs to the binary): namespaces, pods and `EgressGatewayPolicy`
//! objects ([`model`]), with gateway choice expressed in the Calico selector language ([`selector`]).
//! [`resolve`] turns (pod, destination IP) into a [`Decision`], following Calico
//! Enterprise's rules (annotation precedence, longest-prefix rule match, `maxNextHops`,
//! `gatewayPreference: PreferNodeLocal`, fail closed when a named policy is missing), and says why in an
//! [`Explanation`].
//!
//! Layers, bottom to top: [`selector`] → [`model`] → [`resolve`]. No I/O, no clock, no `unsafe`.
#![forbid(unsafe_code)]

pub mod model;
pub mod resolve;
pub mod selector;

pub use model::{EgressGatewayPolicy, GatewaySpec, Namespace, Pod, PolicyError, Preference, Rule};
pub use resolve::{
    AnnotationSource, BlockReason, Decision, Explanation, GatewayMember, Inventory, PodTable,
    Resolver, TableEntry,
};
pub use selector::{Labels, Selector, SelectorError};
