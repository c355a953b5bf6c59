//! One query in, one reply out: the pure part of the server (no sockets,
//! no clock), so every rule below is testable on bytes.
//!
//! | query | reply |
//! |---|---|
//! | fewer than 12 bytes, or a response (QR set) | dropped: nothing to answer, and answering responses invites loops |
//! | opcode other than QUERY | NOTIMP |
//! | undecodable body, QDCOUNT ≠ 1, two OPT records, trailing bytes | FORMERR |
//! | EDNS version > 0 | BADVERS |
//! | class other than IN (or ANY) | REFUSED |
//! | name outside `berth.` | REFUSED, not authoritative (we are not a recursor) |
//! | AXFR/IXFR | REFUSED (no zone transfers) |
//! | name not in the zone | NXDOMAIN, SOA in authority |
//! | name in the zone, no record of that type | NOERROR, empty answer, SOA in authority (NODATA) |
//! | otherwise | the records, authoritative; SRV targets' addresses in additional |
//!
//! Size: over UDP a reply is cut to 512 bytes, or to the client's EDNS
//! payload size capped at [`MAX_UDP_PAYLOAD`]. Only whole records are
//! dropped; losing an answer record sets TC (the client retries over TCP),
//! losing only additional records does not (RFC 2181 §9).

use std::net::IpAddr;

use super::wire::{
    Edns, HEADER_LEN, Header, OPT_LEN, Question, Rcode, Section, Writer, class, lookup_key,
    parse_body, rtype,
};
use super::zone::{APEX, Node, Zone};

/// The largest UDP reply we send, and the payload size we advertise: the
/// 2020 DNS flag day's figure, which avoids IP fragmentation on real
/// networks.
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// The classic UDP limit for clients without EDNS.
const PLAIN_UDP_LIMIT: usize = 512;
const TCP_LIMIT: usize = u16::MAX as usize;
/// A compression pointer holds a 14-bit offset.
const MAX_POINTER: usize = 0x3fff;

/// How a reply is shaped.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// TTL of every record, and the SOA minimum (negative-caching TTL).
    pub ttl: u32,
    /// Over UDP (size limits apply) or TCP.
    pub udp: bool,
    /// Rotates multi-record answers so naive clients that take the first
    /// address spread over instances.
    pub rotate: usize,
}

/// What became of one query.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The reply, or `None` when the query is dropped.
    pub reply: Option<Vec<u8>>,
    /// The question's type, if one was decoded.
    pub qtype: Option<u16>,
    /// The reply's rcode.
    pub rcode: Option<Rcode>,
    /// Answer records were dropped to fit the size limit.
    pub truncated: bool,
}

impl Outcome {
    fn dropped() -> Self {
        Outcome {
            reply: None,
            qtype: None,
            rcode: None,
            truncated: false,
        }
    }
}

/// Answer `packet` from `zone`.
pub(crate) fn respond(packet: &[u8], zone: &Zone, shape: Shape) -> Outcome {
    let Some(h) = Header::parse(packet) else {
        return Outcome::dropped();
    };
    if h.qr {
        return Outcome::dropped();
    }
    if h.opcode != 0 {
        return bare(&h, None, Rcode::NotImp, None);
    }
    let body = match parse_body(packet, &h) {
        Ok(b) => b,
        Err(e) => return bare(&h, e.question.as_ref(), Rcode::FormErr, None),
    };
    let q = &body.question;
    if let Some(edns) = body.edns
        && edns.version > 0
    {
        return bare(&h, Some(q), Rcode::BadVers, Some(edns));
    }
    if q.qclass != class::IN && q.qclass != class::ANY {
        return bare(&h, Some(q), Rcode::Refused, body.edns);
    }
    let in_zone = q
        .labels
        .last()
        .is_some_and(|l| l.eq_ignore_ascii_case(APEX.as_bytes()));
    if !in_zone || q.qtype == rtype::AXFR || q.qtype == rtype::IXFR {
        return bare(&h, Some(q), Rcode::Refused, body.edns);
    }
    let node = lookup_key(&q.labels).and_then(|k| zone.node(&k));
    let limit = if !shape.udp {
        TCP_LIMIT
    } else if let Some(e) = body.edns {
        (e.payload.min(MAX_UDP_PAYLOAD) as usize).max(PLAIN_UDP_LIMIT)
    } else {
        PLAIN_UDP_LIMIT
    };
    authoritative(&h, q, body.edns, node, zone, shape, limit)
}

/// A reply with no records (but the OPT record when the query had one).
fn bare(h: &Header, q: Option<&Question>, rcode: Rcode, edns: Option<Edns>) -> Outcome {
    let mut w = Writer::new(h, 512);
    if let Some(q) = q {
        w.question(q);
    }
    w.set_rcode(rcode);
    if let Some(e) = edns {
        w.opt(MAX_UDP_PAYLOAD, rcode, e.dnssec_ok);
    }
    Outcome {
        reply: Some(w.finish()),
        qtype: q.map(|q| q.qtype),
        rcode: Some(rcode),
        truncated: false,
    }
}

fn authoritative(
    h: &Header,
    q: &Question,
    edns: Option<Edns>,
    node: Option<&Node>,
    zone: &Zone,
    shape: Shape,
    limit: usize,
) -> Outcome {
    let mut w = Writer::new(h, 512);
    w.set_authoritative();
    let offsets = w.question(q);
    // The `berth` label is the question's last: every name we write ends
    // there, so it is the one pointer target that is always at hand.
    let apex = offsets.last().copied().unwrap_or(HEADER_LEN as u16);
    let owner = HEADER_LEN as u16;
    let budget = limit - if edns.is_some() { OPT_LEN } else { 0 };
    let mut rcode = Rcode::NoError;
    let mut truncated = false;
    let mut answered = 0usize;

    match node {
        None => rcode = Rcode::NxDomain,
        Some(node) => {
            let (a, aaaa, srv) = match q.qtype {
                rtype::A => (true, false, false),
                rtype::AAAA => (false, true, false),
                rtype::SRV => (false, false, true),
                rtype::ANY => (true, true, true),
                _ => (false, false, false),
            };
            let is_apex = q.labels.len() == 1;
            let soa = is_apex && (q.qtype == rtype::SOA || q.qtype == rtype::ANY);
            let mut srv_targets: Vec<(u32, usize)> = Vec::new();
            let mut fits = true;
            if soa {
                fits = put(&mut w, budget, |w| {
                    soa_record(w, Section::Answer, apex, zone, shape.ttl)
                });
                answered += usize::from(fits);
            }
            if a && fits {
                for ip in rotated(&node.v4, shape.rotate) {
                    fits = put(&mut w, budget, |w| {
                        w.record(Section::Answer, owner, rtype::A, shape.ttl, |b| {
                            b.extend_from_slice(&ip.octets())
                        })
                    });
                    if !fits {
                        break;
                    }
                    answered += 1;
                }
            }
            if aaaa && fits {
                for ip in rotated(&node.v6, shape.rotate) {
                    fits = put(&mut w, budget, |w| {
                        w.record(Section::Answer, owner, rtype::AAAA, shape.ttl, |b| {
                            b.extend_from_slice(&ip.octets())
                        })
                    });
                    if !fits {
                        break;
                    }
                    answered += 1;
                }
            }
            if srv && fits {
                for &i in rotated(&node.srv, shape.rotate) {
                    let Some(t) = zone.targets.get(i as usize) else {
                        continue;
                    };
                    let Some(port) = t.port else { continue };
                    let mut at = 0;
                    fits = put(&mut w, budget, |w| {
                        w.record(Section::Answer, owner, rtype::SRV, shape.ttl, |b| {
                            b.extend_from_slice(&1u16.to_be_bytes()); // priority
                            b.extend_from_slice(&1u16.to_be_bytes()); // weight
                            b.extend_from_slice(&port.to_be_bytes());
                            at = b.len();
                            b.extend_from_slice(&t.wire);
                        })
                    });
                    if !fits {
                        break;
                    }
                    answered += 1;
                    srv_targets.push((i, at));
                }
            }
            truncated = !fits;
            if truncated {
                w.set_truncated();
            } else {
                for (i, at) in srv_targets {
                    let Some(t) = zone.targets.get(i as usize) else {
                        continue;
                    };
                    let ok = put(&mut w, budget, |w| {
                        additional_address(w, t.addr, at, &t.wire, shape.ttl)
                    });
                    if !ok {
                        break;
                    }
                }
            }
        }
    }
    if answered == 0 && !truncated {
        // NXDOMAIN or NODATA: the SOA tells caches how long to remember it.
        put(&mut w, budget, |w| {
            soa_record(w, Section::Authority, apex, zone, shape.ttl)
        });
    }
    w.set_rcode(rcode);
    if let Some(e) = edns {
        w.opt(MAX_UDP_PAYLOAD, rcode, e.dnssec_ok);
    }
    Outcome {
        reply: Some(w.finish()),
        qtype: Some(q.qtype),
        rcode: Some(rcode),
        truncated,
    }
}

/// Append what `f` writes if the reply stays within `budget`; otherwise
/// leave the reply as it was and say so.
fn put(w: &mut Writer, budget: usize, f: impl FnOnce(&mut Writer)) -> bool {
    let mark = w.mark();
    f(w);
    if w.len() > budget {
        w.rollback(mark);
        false
    } else {
        true
    }
}

fn rotated<T>(items: &[T], by: usize) -> impl Iterator<Item = &T> {
    let n = items.len();
    let start = if n == 0 { 0 } else { by % n };
    items[start..].iter().chain(items[..start].iter())
}

/// `berth. SOA ns.berth. hostmaster.berth. serial 3600 600 86400 ttl`: the
/// minimum field is the negative-caching TTL (RFC 2308), kept as short as
/// the positive TTL so an instance that just came up is not hidden by a
/// cached NXDOMAIN.
fn soa_record(w: &mut Writer, section: Section, apex: u16, zone: &Zone, ttl: u32) {
    w.record(section, apex, rtype::SOA, ttl, |b| {
        for label in ["ns", "hostmaster"] {
            b.push(label.len() as u8);
            b.extend_from_slice(label.as_bytes());
            b.extend_from_slice(&(0xc000 | apex).to_be_bytes());
        }
        for v in [zone.serial(), 3600, 600, 86400, ttl] {
            b.extend_from_slice(&v.to_be_bytes());
        }
    });
}

/// The A or AAAA record of an SRV target, owned by the name written at
/// `at` in the SRV record (or written out again past pointer range).
fn additional_address(w: &mut Writer, addr: IpAddr, at: usize, wire: &[u8], ttl: u32) {
    let (t, data): (u16, Vec<u8>) = match addr {
        IpAddr::V4(a) => (rtype::A, a.octets().to_vec()),
        IpAddr::V6(a) => (rtype::AAAA, a.octets().to_vec()),
    };
    if at <= MAX_POINTER {
        w.record(Section::Additional, at as u16, t, ttl, |b| {
            b.extend_from_slice(&data)
        });
    } else {
        w.record_named(Section::Additional, wire, t, ttl, |b| {
            b.extend_from_slice(&data)
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dns::wire::encode_name;
    use crate::dns::zone::Instance;
    use proptest::prelude::*;

    const UDP: Shape = Shape {
        ttl: 0,
        udp: true,
        rotate: 0,
    };

    fn zone(n: usize) -> Zone {
        let mut b = Zone::builder();
        for i in 0..n {
            b.push(
                "default",
                "shop",
                "web",
                Instance {
                    instance: format!("web.{i}"),
                    addr: format!("10.0.{}.{}", i / 250, i % 250 + 1).parse().unwrap(),
                    port: Some(5000 + i as u16),
                    node: "n1".into(),
                },
            );
        }
        b.build()
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(encode_name(name));
        q.extend(qtype.to_be_bytes());
        q.extend(class::IN.to_be_bytes());
        q
    }

    fn counts(reply: &[u8]) -> [u16; 4] {
        let c = |i: usize| u16::from_be_bytes([reply[i], reply[i + 1]]);
        [c(4), c(6), c(8), c(10)]
    }

    #[test]
    fn rcodes() {
        let z = zone(2);
        let rc = |p: &[u8]| respond(p, &z, UDP).rcode;
        assert_eq!(
            rc(&query("web.shop.default.berth", rtype::A)),
            Some(Rcode::NoError)
        );
        assert_eq!(rc(&query("nope.berth", rtype::A)), Some(Rcode::NxDomain));
        assert_eq!(rc(&query("example.com", rtype::A)), Some(Rcode::Refused));
        assert_eq!(rc(&query("berth", rtype::AXFR)), Some(Rcode::Refused));
        let mut notify = query("berth", rtype::SOA);
        notify[2] = 4 << 3;
        assert_eq!(rc(&notify), Some(Rcode::NotImp));
        let mut two = query("berth", rtype::SOA);
        two[5] = 2;
        assert_eq!(rc(&two), Some(Rcode::FormErr));
        let mut response = query("berth", rtype::SOA);
        response[2] |= 0x80;
        assert!(respond(&response, &z, UDP).reply.is_none());
        assert!(respond(&[1, 2, 3], &z, UDP).reply.is_none());
    }

    #[test]
    fn nodata_and_nxdomain_carry_the_soa() {
        let z = zone(1);
        for name in ["web.shop.default.berth", "shop.default.berth", "nope.berth"] {
            let r = respond(&query(name, rtype::AAAA), &z, UDP).reply.unwrap();
            assert_eq!(counts(&r), [1, 0, 1, 0], "{name}");
            assert_ne!(r[2] & 0x04, 0, "authoritative");
        }
    }

    #[test]
    fn srv_with_additional_addresses() {
        let z = zone(3);
        let o = respond(&query("_web._tcp.shop.berth", rtype::SRV), &z, UDP);
        assert_eq!(counts(&o.reply.unwrap()), [1, 3, 0, 3]);
    }

    #[test]
    fn truncates_without_edns_and_not_over_tcp() {
        let z = zone(40);
        let q = query("web.shop.default.berth", rtype::SRV);
        let o = respond(&q, &z, UDP);
        let r = o.reply.unwrap();
        assert!(o.truncated && r.len() <= 512 && r[2] & 0x02 != 0);
        assert!(counts(&r)[1] > 0 && counts(&r)[3] == 0);
        let o = respond(&q, &z, Shape { udp: false, ..UDP });
        assert!(!o.truncated);
        assert_eq!(counts(&o.reply.unwrap()), [1, 40, 0, 40]);
    }

    #[test]
    fn edns_raises_the_limit_and_drops_only_additional_when_it_can() {
        let z = zone(20);
        let mut q = query("web.shop.default.berth", rtype::SRV);
        q[11] = 1;
        q.extend([0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
        let o = respond(&q, &z, UDP);
        let r = o.reply.unwrap();
        assert!(!o.truncated && r.len() <= MAX_UDP_PAYLOAD as usize);
        let [_, an, _, ar] = counts(&r);
        assert_eq!(an, 20);
        assert!(ar >= 1, "the OPT record is always there");
    }

    #[test]
    fn big_tcp_answers_fall_back_from_pointers_to_full_names() {
        let z = zone(600);
        let o = respond(
            &query("web.berth", rtype::SRV),
            &z,
            Shape { udp: false, ..UDP },
        );
        let r = o.reply.unwrap();
        assert!(r.len() > MAX_POINTER);
        assert_eq!(counts(&r), [1, 600, 0, 600]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn never_panics_and_stays_within_limits(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            udp in any::<bool>(),
        ) {
            let z = zone(30);
            let o = respond(&bytes, &z, Shape { udp, ..UDP });
            if let Some(r) = o.reply {
                let limit = if udp { MAX_UDP_PAYLOAD as usize } else { TCP_LIMIT };
                prop_assert!(r.len() <= limit);
                prop_assert_eq!(&r[..2], &bytes[..2]);
            }
        }
    }
}
