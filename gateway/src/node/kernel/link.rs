//! The vxlan device: the messages that create, fix and delete it, and reading an existing one.
//!
//! It is made as Felix makes `egress.calico`: `ip link add <name> type vxlan id <vni> dstport <port> local
//! <local> dev <underlay> nolearning`, its MTU, up, and `ip link set <name> alias` [`DEVICE_ALIAS`], the mark
//! by which the agent knows the device is its own.

use std::net::Ipv4Addr;

use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::KernelError;
use crate::node::state::{VxlanSpec, DEVICE_ALIAS};

/// The longest device name the kernel takes (`IFNAMSIZ` - 1).
const MAX_NAME: usize = 15;

/// Refuses a name the kernel would refuse (`dev_valid_name`), which also makes it safe as a path component.
pub(super) fn check_name(name: &str) -> Result<(), KernelError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("it is . or ..")
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
    {
        Some("it contains '/', ':', a NUL or white space")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(KernelError::InvalidDeviceName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// `RTM_GETLINK` for the device called `name`.
pub(super) fn get_request(name: &str) -> LinkMessage {
    let mut message = LinkMessage::default();
    message
        .attributes
        .push(LinkAttribute::IfName(name.to_owned()));
    message
}

/// `RTM_NEWLINK` that creates the device (with `NLM_F_CREATE | NLM_F_EXCL`). It carries the alias too,
/// although the kernel only takes an alias on `RTM_SETLINK` ([`alias_message`]).
pub(super) fn create_message(spec: &VxlanSpec, underlay: u32) -> LinkMessage {
    LinkVxlan::new(&spec.device, spec.vni)
        .port(spec.port)
        .local(spec.local)
        .dev(underlay)
        .learning(false)
        .mtu(spec.mtu)
        .alias(DEVICE_ALIAS)
        .up()
        .build()
}

/// `RTM_SETLINK` that gives device `index` the agent's alias.
pub(super) fn alias_message(index: u32) -> LinkMessage {
    LinkUnspec::new_with_index(index)
        .alias(DEVICE_ALIAS)
        .build()
}

/// `RTM_DELLINK` for device `index`.
pub(super) fn delete_message(index: u32) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message
}

/// `RTM_SETLINK` that sets the MTU and up, if the device needs it.
pub(super) fn fix_message(found: &Observed, spec: &VxlanSpec) -> Option<LinkMessage> {
    if found.mtu == Some(spec.mtu) && found.up {
        return None;
    }
    Some(
        LinkUnspec::new_with_index(found.index)
            .mtu(spec.mtu)
            .up()
            .build(),
    )
}

/// What an existing device is, as far as the agent cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Observed {
    /// Its ifindex.
    pub(super) index: u32,
    /// Its alias.
    pub(super) alias: Option<String>,
    /// Whether it is a vxlan device.
    pub(super) vxlan: bool,
    /// VXLAN network identifier.
    pub(super) vni: Option<u32>,
    /// Destination port.
    pub(super) port: Option<u16>,
    /// Local address.
    pub(super) local: Option<Ipv4Addr>,
    /// Underlay ifindex.
    pub(super) underlay: Option<u32>,
    /// Whether it learns source addresses.
    pub(super) learning: Option<bool>,
    /// Its MTU.
    pub(super) mtu: Option<u32>,
    /// Administratively up.
    pub(super) up: bool,
}

impl Observed {
    /// Reads a `RTM_NEWLINK` answer.
    pub(super) fn read(message: &LinkMessage) -> Observed {
        let mut found = Observed {
            index: message.header.index,
            up: message.header.flags.contains(LinkFlags::Up),
            ..Observed::default()
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfAlias(alias) => found.alias = Some(alias.clone()),
                LinkAttribute::Mtu(mtu) => found.mtu = Some(*mtu),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => found.vxlan = *kind == InfoKind::Vxlan,
                            LinkInfo::Data(InfoData::Vxlan(data)) => found.read_vxlan(data),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        found
    }

    fn read_vxlan(&mut self, data: &[InfoVxlan]) {
        for item in data {
            match item {
                InfoVxlan::Id(vni) => self.vni = Some(*vni),
                InfoVxlan::Port(port) => self.port = Some(*port),
                InfoVxlan::Local(local) => self.local = Some(*local),
                InfoVxlan::Link(index) => self.underlay = Some(*index),
                InfoVxlan::Learning(learning) => self.learning = Some(*learning),
                _ => {}
            }
        }
    }

    /// Whether the agent made it (its alias is [`DEVICE_ALIAS`]).
    pub(super) fn is_ours(&self) -> bool {
        self.alias.as_deref() == Some(DEVICE_ALIAS)
    }

    /// How the tunnel differs from `spec` over the device `underlay` (empty: it does not). These cannot be
    /// changed in place; the device is made again.
    pub(super) fn tunnel_differences(&self, spec: &VxlanSpec, underlay: u32) -> Vec<String> {
        fn show<T: std::fmt::Display>(value: Option<T>) -> String {
            value.map_or_else(|| "none".to_owned(), |v| v.to_string())
        }
        let mut differences = Vec::new();
        if !self.vxlan {
            differences.push("it is not a vxlan device".to_owned());
        }
        if self.vni != Some(spec.vni) {
            differences.push(format!("id {} (want {})", show(self.vni), spec.vni));
        }
        if self.port != Some(spec.port) {
            differences.push(format!("dstport {} (want {})", show(self.port), spec.port));
        }
        if self.local != Some(spec.local) {
            differences.push(format!("local {} (want {})", show(self.local), spec.local));
        }
        if self.underlay != Some(underlay) {
            differences.push(format!(
                "dev index {} (want {} = {})",
                show(self.underlay),
                underlay,
                spec.underlay_device
            ));
        }
        if self.learning != Some(false) {
            differences.push("learning (want nolearning)".to_owned());
        }
        differences
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_core::{Emitable, Parseable};

    fn spec() -> VxlanSpec {
        VxlanSpec {
            device: "egress.calico".into(),
            vni: 4097,
            port: 4790,
            mtu: 1410,
            local: Ipv4Addr::new(192, 0, 2, 10),
            underlay_device: "eth0".into(),
        }
    }

    fn round_trip(message: &LinkMessage) -> LinkMessage {
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        LinkMessage::parse(bytes.as_slice()).unwrap()
    }

    #[test]
    fn names_the_kernel_refuses_are_refused() {
        assert!(check_name("egress.calico").is_ok());
        for bad in ["", "a-name-of-16-byt", ".", "..", "a/b", "a b", "a:b"] {
            let e = check_name(bad).unwrap_err();
            assert!(e.to_string().starts_with("invalid device name"), "{e}");
        }
    }

    #[test]
    fn the_created_device_reads_back_as_the_spec() {
        let message = round_trip(&create_message(&spec(), 3));
        assert!(message.header.flags.contains(LinkFlags::Up));
        assert!(message
            .attributes
            .contains(&LinkAttribute::IfName("egress.calico".into())));
        let mut found = Observed::read(&message);
        assert!(found.vxlan);
        assert!(found.is_ours());
        assert_eq!(found.mtu, Some(1410));
        assert!(found.tunnel_differences(&spec(), 3).is_empty());
        assert!(fix_message(&found, &spec()).is_none());

        found.mtu = Some(1450);
        assert!(fix_message(&found, &spec()).is_some());
        found.local = Some(Ipv4Addr::new(192, 0, 2, 11));
        found.learning = Some(true);
        assert_eq!(
            found.tunnel_differences(&spec(), 4),
            [
                "local 192.0.2.11 (want 192.0.2.10)",
                "dev index 3 (want 4 = eth0)",
                "learning (want nolearning)"
            ]
        );
    }

    #[test]
    fn a_device_without_the_alias_is_not_ours() {
        let mut message = create_message(&spec(), 3);
        message
            .attributes
            .retain(|a| !matches!(a, LinkAttribute::IfAlias(_)));
        assert!(!Observed::read(&message).is_ours());
        let alias = alias_message(9);
        assert_eq!(alias.header.index, 9);
        assert!(alias
            .attributes
            .contains(&LinkAttribute::IfAlias(DEVICE_ALIAS.into())));
    }
}
