//! [`Zone`]: the `berth.` zone as the server hands it in, compiled once per
//! change into a map from lowercased name to the records it owns, so that
//! answering is one hash lookup.
//!
//! Names, for an instance `web.3` of service `web` in stack `shop`,
//! namespace `default`:
//!
//! | name | owns |
//! |---|---|
//! | `web.shop.default.berth.` | A/AAAA of every instance, one SRV per instance with a port |
//! | `web.shop.berth.` | the same, for namespace `default` only |
//! | `web.berth.` | the same, namespace `default`, **union over all stacks** that have a `web` |
//! | `_web._tcp.shop.default.berth.` (and `_web._tcp.shop.berth.` in `default`) | the SRV records (RFC 2782 form) |
//! | `3.web.shop.default.berth.` | the instance's own A or AAAA (and its SRV): the SRV targets |
//!
//! A service with an empty stack (registered from outside berth) has the
//! same names without the stack label: `web.default.berth.`, `web.berth.`,
//! `_web._tcp.default.berth.`, `<slot>.web.default.berth.`.
//!
//! `web.berth.` answers the union when two stacks of namespace `default`
//! both have a `web` rather than NXDOMAIN: "the name exists but is
//! ambiguous" is not something a resolver can report, and a union of
//! healthy instances of same-named services is what a client asking for
//! "web" most likely wants. Any other collision between two spellings (a
//! stack named like a namespace, say) is resolved the same way: the name
//! owns the union of both. Every ancestor of an owned name, up to `berth.`,
//! exists too (an empty non-terminal answers NODATA, not NXDOMAIN: RFC 8020
//! lets a resolver treat NXDOMAIN as "nothing below exists either").

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::wire::encode_name;

/// The zone apex, without its trailing dot.
pub const APEX: &str = "berth";

/// One healthy instance of a service, as the DNS server should publish it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// The instance's name, `<service>.<slot>` (`web.3`); the part after
    /// the service name becomes the SRV target's first label (`3`).
    pub instance: String,
    /// Where it can be reached: an A record for IPv4, AAAA for IPv6.
    pub addr: IpAddr,
    /// The port it serves on; instances without one get no SRV record.
    pub port: Option<u16>,
    /// The node it runs on (kept for listings; not published in DNS).
    pub node: String,
}

/// Identity of a service in the zone.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    /// The namespace (`default`, `staging`…).
    pub namespace: String,
    /// The stack.
    pub stack: String,
    /// The service.
    pub service: String,
}

/// An SRV target: one instance's own name and address.
#[derive(Debug)]
pub(crate) struct Target {
    /// The full name, uncompressed wire form (RFC 2782: SRV targets are
    /// never compressed).
    pub wire: Box<[u8]>,
    pub addr: IpAddr,
    pub port: Option<u16>,
}

/// What one name owns.
#[derive(Debug, Default)]
pub(crate) struct Node {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    /// Indices into [`Zone::targets`] of the instances with a port.
    pub srv: Vec<u32>,
}

impl Node {
    /// Publish `t` here; `addresses` is false on `_service._tcp` names,
    /// which own SRV records only, as in RFC 2782 zones.
    fn add(&mut self, target_index: u32, t: &Target, addresses: bool) {
        match t.addr {
            _ if !addresses => {}
            // An RRset holds no duplicates (RFC 2181 §5), and on one machine
            // every process instance shares 127.0.0.1.
            IpAddr::V4(a) if !self.v4.contains(&a) => self.v4.push(a),
            IpAddr::V6(a) if !self.v6.contains(&a) => self.v6.push(a),
            _ => {}
        }
        if t.port.is_some() && !self.srv.contains(&target_index) {
            self.srv.push(target_index);
        }
    }
}

/// The compiled `berth.` zone. Cheap to share (`Arc<Zone>` over a watch
/// channel); immutable once built.
#[derive(Debug, Default)]
pub struct Zone {
    pub(crate) nodes: HashMap<String, Node>,
    pub(crate) targets: Vec<Target>,
    services: BTreeMap<ServiceName, Vec<Instance>>,
    rejected: Vec<String>,
    serial: u32,
}

impl Zone {
    /// Start an empty zone.
    pub fn builder() -> ZoneBuilder {
        ZoneBuilder::default()
    }

    /// The services and their instances, as given to the builder.
    pub fn services(&self) -> &BTreeMap<ServiceName, Vec<Instance>> {
        &self.services
    }

    /// Every name the zone answers for (lowercase, no trailing dot), in no
    /// particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Instances left out because no valid DNS name could be made for them
    /// (a label over 63 bytes, a name over 255, an empty or dotted label,
    /// a duplicate instance name), each with the reason; the server should
    /// log these.
    pub fn rejected(&self) -> &[String] {
        &self.rejected
    }

    /// The SOA serial.
    pub fn serial(&self) -> u32 {
        self.serial
    }

    pub(crate) fn node(&self, key: &str) -> Option<&Node> {
        self.nodes.get(key)
    }
}

/// Collects instances, then compiles them with [`ZoneBuilder::build`].
#[derive(Debug, Default)]
pub struct ZoneBuilder {
    services: BTreeMap<ServiceName, Vec<Instance>>,
    serial: u32,
}

impl ZoneBuilder {
    /// Add one healthy instance of `service` in `stack`, `namespace`.
    pub fn instance(
        mut self,
        namespace: impl Into<String>,
        stack: impl Into<String>,
        service: impl Into<String>,
        instance: Instance,
    ) -> Self {
        self.push(namespace, stack, service, instance);
        self
    }

    /// Add one instance through a `&mut` (for loops).
    pub fn push(
        &mut self,
        namespace: impl Into<String>,
        stack: impl Into<String>,
        service: impl Into<String>,
        instance: Instance,
    ) -> &mut Self {
        let key = ServiceName {
            namespace: namespace.into(),
            stack: stack.into(),
            service: service.into(),
        };
        self.services.entry(key).or_default().push(instance);
        self
    }

    /// The SOA serial (e.g. the store revision the catalog was read at);
    /// secondaries do not exist here, so it is informational only.
    pub fn serial(mut self, serial: u32) -> Self {
        self.serial = serial;
        self
    }

    /// Compile the lookup map.
    pub fn build(self) -> Zone {
        let mut zone = Zone {
            serial: self.serial,
            ..Zone::default()
        };
        zone.nodes.insert(APEX.to_owned(), Node::default());
        for (name, instances) in &self.services {
            compile_service(&mut zone, name, instances);
        }
        zone.services = self.services;
        zone
    }
}

fn compile_service(zone: &mut Zone, name: &ServiceName, instances: &[Instance]) {
    let ns = name.namespace.to_ascii_lowercase();
    let stack = name.stack.to_ascii_lowercase();
    let service = name.service.to_ascii_lowercase();
    // A service registered from outside berth (Consul API) has no stack:
    // its names simply leave that label out.
    let stack = if stack.is_empty() {
        String::new()
    } else {
        format!("{stack}.")
    };
    let full = format!("{service}.{stack}{ns}.{APEX}");
    if let Err(why) = check_name(&full) {
        zone.rejected.push(format!("{full}: {why}"));
        return;
    }
    let mut owners = vec![full.clone(), format!("_{service}._tcp.{stack}{ns}.{APEX}")];
    if ns == "default" {
        owners.push(format!("{service}.{stack}{APEX}"));
        owners.push(format!("{service}.{APEX}"));
        owners.push(format!("_{service}._tcp.{stack}{APEX}"));
    }
    owners.dedup();
    // The short and `_tcp` spellings are never longer than the full one
    // by more than the `_`/`_tcp` labels; check each anyway.
    owners.retain(|o| match check_name(o) {
        Ok(()) => true,
        Err(why) => {
            zone.rejected.push(format!("{o}: {why}"));
            false
        }
    });
    for owner in &owners {
        ensure_with_ancestors(zone, owner);
    }
    let mut slots: Vec<String> = Vec::new();
    for inst in instances {
        let slot = slot_label(&service, &inst.instance);
        let target = format!("{slot}.{full}");
        if let Err(why) = check_name(&target) {
            zone.rejected.push(format!("{target}: {why}"));
            continue;
        }
        if slots.contains(&slot) {
            zone.rejected
                .push(format!("{target}: duplicate instance name"));
            continue;
        }
        slots.push(slot);
        let index = zone.targets.len() as u32;
        let t = Target {
            wire: encode_name(&target).into_boxed_slice(),
            addr: inst.addr,
            port: inst.port,
        };
        ensure_with_ancestors(zone, &target);
        for owner in owners.iter().chain(std::iter::once(&target)) {
            if let Some(node) = zone.nodes.get_mut(owner) {
                node.add(index, &t, !owner.starts_with('_'));
            }
        }
        zone.targets.push(t);
    }
}

/// Insert `name` and every ancestor up to the apex, as empty nodes where
/// absent.
fn ensure_with_ancestors(zone: &mut Zone, name: &str) {
    let mut rest = name;
    loop {
        if zone.nodes.contains_key(rest) {
            // Ancestors were inserted along with it.
            if rest != name {
                return;
            }
        } else {
            zone.nodes.insert(rest.to_owned(), Node::default());
        }
        match rest.split_once('.') {
            Some((_, parent)) => rest = parent,
            None => return,
        }
    }
}

/// `web.3` of service `web` → `3`; anything else → the instance name with
/// its dots turned into dashes, so it stays one label.
fn slot_label(service: &str, instance: &str) -> String {
    let lower = instance.to_ascii_lowercase();
    let slot = lower
        .strip_prefix(service)
        .and_then(|s| s.strip_prefix('.'))
        .filter(|s| !s.is_empty())
        .unwrap_or(&lower);
    slot.replace('.', "-")
}

/// A name this zone can publish: labels of 1..=63 printable ASCII bytes,
/// 255 bytes at most on the wire.
fn check_name(dotted: &str) -> Result<(), &'static str> {
    if dotted.len() + 2 > 255 {
        return Err("name longer than 255 bytes");
    }
    for label in dotted.split('.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 bytes");
        }
        if !label.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("label with a space, control or non-ASCII byte");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn inst(name: &str, addr: &str, port: Option<u16>) -> Instance {
        Instance {
            instance: name.into(),
            addr: addr.parse().unwrap(),
            port,
            node: "n1".into(),
        }
    }

    #[test]
    fn names_and_ancestors() {
        let zone = Zone::builder()
            .instance(
                "default",
                "Shop",
                "web",
                inst("web.1", "127.0.0.1", Some(5000)),
            )
            .instance(
                "default",
                "shop",
                "web",
                inst("web.2", "127.0.0.1", Some(5001)),
            )
            .instance("staging", "shop", "web", inst("web.1", "::1", None))
            .build();
        let mut names: Vec<_> = zone.names().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "1.web.shop.default.berth",
                "1.web.shop.staging.berth",
                "2.web.shop.default.berth",
                "_tcp.shop.berth",
                "_tcp.shop.default.berth",
                "_tcp.shop.staging.berth",
                "_web._tcp.shop.berth",
                "_web._tcp.shop.default.berth",
                "_web._tcp.shop.staging.berth",
                "berth",
                "default.berth",
                "shop.berth",
                "shop.default.berth",
                "shop.staging.berth",
                "staging.berth",
                "web.berth",
                "web.shop.berth",
                "web.shop.default.berth",
                "web.shop.staging.berth",
            ]
        );
        let web = zone.node("web.shop.default.berth").unwrap();
        assert_eq!(
            web.v4,
            ["127.0.0.1".parse::<Ipv4Addr>().unwrap()],
            "deduplicated"
        );
        assert_eq!(web.srv.len(), 2);
        let tcp = zone.node("_web._tcp.shop.berth").unwrap();
        assert!(tcp.v4.is_empty() && tcp.srv.len() == 2);
        let staging = zone.node("web.shop.staging.berth").unwrap();
        assert_eq!(
            (staging.v6.len(), staging.srv.len()),
            (1, 0),
            "no port, no SRV"
        );
    }

    #[test]
    fn short_name_is_the_union_over_stacks() {
        let zone = Zone::builder()
            .instance("default", "a", "web", inst("web.1", "10.0.0.1", Some(1)))
            .instance("default", "b", "web", inst("web.1", "10.0.0.2", Some(2)))
            .build();
        let web = zone.node("web.berth").unwrap();
        assert_eq!(web.v4.len(), 2);
        assert_eq!(web.srv.len(), 2);
    }

    #[test]
    fn unpublishable_names_are_rejected_not_truncated() {
        let zone = Zone::builder()
            .instance(
                "default",
                "shop",
                "x".repeat(64),
                inst("x.1", "10.0.0.1", None),
            )
            .instance("default", "shop", "web", inst("web.1", "10.0.0.1", None))
            .instance("default", "shop", "web", inst("web.1", "10.0.0.2", None))
            .build();
        assert_eq!(zone.rejected().len(), 2, "{:?}", zone.rejected());
        assert!(zone.node("1.web.shop.default.berth").is_some());
    }

    #[test]
    fn services_without_a_stack_leave_the_label_out() {
        let zone = Zone::builder()
            .instance("default", "", "ext", inst("reg-1", "10.0.0.9", Some(80)))
            .build();
        assert!(zone.rejected().is_empty(), "{:?}", zone.rejected());
        for name in [
            "ext.default.berth",
            "ext.berth",
            "_ext._tcp.default.berth",
            "_ext._tcp.berth",
        ] {
            assert_eq!(zone.node(name).unwrap().srv.len(), 1, "{name}");
        }
        assert_eq!(zone.node("reg-1.ext.default.berth").unwrap().v4.len(), 1);
    }

    #[test]
    fn slot_labels() {
        assert_eq!(slot_label("web", "web.3"), "3");
        assert_eq!(slot_label("web", "Web.3"), "3");
        assert_eq!(slot_label("web", "api.1"), "api-1");
        assert_eq!(slot_label("web", "web."), "web-");
    }
}
