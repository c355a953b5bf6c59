//! Query counters (relaxed atomics, bumped once per query) and the
//! [`DnsMetricsSnapshot`] the metrics endpoint will read.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::answer::Outcome;
use super::wire::{Rcode, rtype};

#[derive(Clone, Copy)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// Indices into [`Counters::by_type`].
const TYPES: [u16; 5] = [rtype::A, rtype::AAAA, rtype::SRV, rtype::SOA, rtype::ANY];
/// Indices into [`Counters::by_rcode`].
const RCODES: [Rcode; 6] = [
    Rcode::NoError,
    Rcode::FormErr,
    Rcode::NxDomain,
    Rcode::NotImp,
    Rcode::Refused,
    Rcode::BadVers,
];

#[derive(Debug, Default)]
pub(crate) struct Counters {
    udp: AtomicU64,
    tcp: AtomicU64,
    /// A, AAAA, SRV, SOA, ANY, then everything else.
    by_type: [AtomicU64; TYPES.len() + 1],
    by_rcode: [AtomicU64; RCODES.len()],
    truncated: AtomicU64,
    dropped: AtomicU64,
}

impl Counters {
    pub fn record(&self, transport: Transport, o: &Outcome) {
        let bump = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        bump(match transport {
            Transport::Udp => &self.udp,
            Transport::Tcp => &self.tcp,
        });
        if o.reply.is_none() {
            bump(&self.dropped);
        }
        if let Some(t) = o.qtype {
            let i = TYPES.iter().position(|&x| x == t).unwrap_or(TYPES.len());
            bump(&self.by_type[i]);
        }
        if let Some(r) = o.rcode
            && let Some(i) = RCODES.iter().position(|&x| x == r)
        {
            bump(&self.by_rcode[i]);
        }
        if o.truncated {
            bump(&self.truncated);
        }
    }
}

/// A cheap handle on a running server's counters.
#[derive(Clone, Debug)]
pub struct DnsMetrics(Arc<Counters>);

impl DnsMetrics {
    pub(crate) fn new(c: Arc<Counters>) -> Self {
        DnsMetrics(c)
    }

    /// The counters now (each read on its own: a snapshot taken under load
    /// may be off by the queries in flight).
    pub fn snapshot(&self) -> DnsMetricsSnapshot {
        let c = &self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DnsMetricsSnapshot {
            udp_queries: get(&c.udp),
            tcp_queries: get(&c.tcp),
            by_type: QueryTypeCounts {
                a: get(&c.by_type[0]),
                aaaa: get(&c.by_type[1]),
                srv: get(&c.by_type[2]),
                soa: get(&c.by_type[3]),
                any: get(&c.by_type[4]),
                other: get(&c.by_type[5]),
            },
            by_rcode: RcodeCounts {
                noerror: get(&c.by_rcode[0]),
                formerr: get(&c.by_rcode[1]),
                nxdomain: get(&c.by_rcode[2]),
                notimp: get(&c.by_rcode[3]),
                refused: get(&c.by_rcode[4]),
                badvers: get(&c.by_rcode[5]),
            },
            truncated: get(&c.truncated),
            dropped: get(&c.dropped),
        }
    }
}

/// Queries counted since the server started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsMetricsSnapshot {
    /// Datagrams received (answered or not).
    pub udp_queries: u64,
    /// Messages received over TCP.
    pub tcp_queries: u64,
    /// By question type, for queries whose question could be read.
    pub by_type: QueryTypeCounts,
    /// By reply code, for queries that got a reply.
    pub by_rcode: RcodeCounts,
    /// UDP replies cut short with the TC bit.
    pub truncated: u64,
    /// Messages dropped unanswered (shorter than a header, or responses).
    pub dropped: u64,
}

/// Queries by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueryTypeCounts {
    /// A.
    pub a: u64,
    /// AAAA.
    pub aaaa: u64,
    /// SRV.
    pub srv: u64,
    /// SOA.
    pub soa: u64,
    /// ANY.
    pub any: u64,
    /// Every other type.
    pub other: u64,
}

/// Replies by rcode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RcodeCounts {
    /// Answered, possibly with no records (NODATA).
    pub noerror: u64,
    /// Malformed query.
    pub formerr: u64,
    /// Name not in the zone.
    pub nxdomain: u64,
    /// Opcode other than QUERY.
    pub notimp: u64,
    /// Outside `berth.`, zone transfers, classes other than IN.
    pub refused: u64,
    /// EDNS version above 0.
    pub badvers: u64,
}
