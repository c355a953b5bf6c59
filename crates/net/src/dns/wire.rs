//! The DNS wire format (RFC 1035, EDNS0 from RFC 6891), for the little this
//! server needs: decoding a query (header, one question, skipping answer and
//! authority records, finding the OPT record) and encoding answers with A,
//! AAAA, SRV, SOA and OPT records.
//!
//! Hand-rolled rather than taken from a DNS library because the subset is
//! small and the decoder's one hard duty — never panic, never loop, never
//! read out of bounds on hostile bytes — is easier to check in 200 lines we
//! own (and is fuzzed by proptest in this module's tests).

/// Record and query types this server names.
pub(crate) mod rtype {
    pub const A: u16 = 1;
    pub const SOA: u16 = 6;
    pub const AAAA: u16 = 28;
    pub const SRV: u16 = 33;
    pub const OPT: u16 = 41;
    pub const IXFR: u16 = 251;
    pub const AXFR: u16 = 252;
    pub const ANY: u16 = 255;
}

/// Classes: IN, and ANY (QCLASS `*`), which we treat as IN.
pub(crate) mod class {
    pub const IN: u16 = 1;
    pub const ANY: u16 = 255;
}

/// Response codes (the low 4 bits in the header; BADVERS needs the OPT
/// record's extended-rcode byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rcode {
    NoError,
    FormErr,
    NxDomain,
    NotImp,
    Refused,
    /// EDNS version not supported (16: header rcode 0, extended byte 1).
    BadVers,
}

impl Rcode {
    fn header_bits(self) -> u8 {
        match self {
            Rcode::NoError | Rcode::BadVers => 0,
            Rcode::FormErr => 1,
            Rcode::NxDomain => 3,
            Rcode::NotImp => 4,
            Rcode::Refused => 5,
        }
    }

    fn extended_bits(self) -> u8 {
        match self {
            Rcode::BadVers => 1,
            _ => 0,
        }
    }
}

pub(crate) const HEADER_LEN: usize = 12;
/// Longest name on the wire, RFC 1035 §2.3.4.
const MAX_NAME_LEN: usize = 255;
/// Size of an OPT record with no options: root name, type, class, ttl, rdlen.
pub(crate) const OPT_LEN: usize = 11;

/// The fixed header fields of a query that a reply must echo.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub id: u16,
    pub opcode: u8,
    pub qr: bool,
    pub rd: bool,
    pub cd: bool,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    /// `None` when there are not even 12 bytes: nothing to reply to.
    pub fn parse(buf: &[u8]) -> Option<Header> {
        let h = buf.get(..HEADER_LEN)?;
        let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        Some(Header {
            id: u16_at(0),
            qr: h[2] & 0x80 != 0,
            opcode: (h[2] >> 3) & 0x0f,
            rd: h[2] & 0x01 != 0,
            cd: h[3] & 0x10 != 0,
            qdcount: u16_at(4),
            ancount: u16_at(6),
            nscount: u16_at(8),
            arcount: u16_at(10),
        })
    }
}

/// A question as received: labels in their original case (echoed back),
/// type and class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Question {
    pub labels: Vec<Vec<u8>>,
    pub qtype: u16,
    pub qclass: u16,
}

/// What the client said in its OPT record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Edns {
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
}

/// A decoded query body.
#[derive(Debug)]
pub(crate) struct Body {
    pub question: Question,
    pub edns: Option<Edns>,
}

/// Why a query's body could not be decoded; the reply is FORMERR (with the
/// question echoed if it was readable).
#[derive(Debug)]
pub(crate) struct FormErr {
    pub question: Option<Question>,
}

/// Decode everything after the header. The caller has checked `QR == 0`
/// and the opcode.
pub(crate) fn parse_body(buf: &[u8], h: &Header) -> Result<Body, FormErr> {
    if h.qdcount != 1 {
        return Err(FormErr { question: None });
    }
    let mut r = Reader {
        buf,
        pos: HEADER_LEN,
    };
    let question = r.question().ok_or(FormErr { question: None })?;
    let fail = |q: &Question| FormErr {
        question: Some(q.clone()),
    };
    for _ in 0..(h.ancount as u32 + h.nscount as u32) {
        r.skip_record().ok_or_else(|| fail(&question))?;
    }
    let mut edns = None;
    for _ in 0..h.arcount {
        let root = r.name_is_root().ok_or_else(|| fail(&question))?;
        let (rtype, rclass, ttl) = r.record_tail().ok_or_else(|| fail(&question))?;
        if rtype == rtype::OPT {
            // RFC 6891 §6.1.1: one OPT, owned by the root; more is FORMERR.
            if !root || edns.is_some() {
                return Err(fail(&question));
            }
            edns = Some(Edns {
                payload: rclass,
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl & 0x8000 != 0,
            });
        }
    }
    if r.pos != buf.len() {
        return Err(fail(&question));
    }
    Ok(Body { question, edns })
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u16(&mut self) -> Option<u16> {
        let b = self.buf.get(self.pos..self.pos + 2)?;
        self.pos += 2;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.buf.get(self.pos..self.pos + 4)?;
        self.pos += 4;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A possibly compressed name. Pointers must point strictly backwards,
    /// which both forbids loops and bounds the work by the message length.
    fn name(&mut self) -> Option<Vec<Vec<u8>>> {
        let mut labels = Vec::new();
        let mut wire_len = 1; // the terminating root byte
        let mut at = self.pos;
        // Where reading resumes once the name is done: after the first pointer.
        let mut resume = None;
        loop {
            let len = *self.buf.get(at)?;
            match len & 0xc0 {
                0x00 if len == 0 => {
                    self.pos = resume.unwrap_or(at + 1);
                    return Some(labels);
                }
                0x00 => {
                    let label = self.buf.get(at + 1..at + 1 + len as usize)?;
                    wire_len += 1 + label.len();
                    if wire_len > MAX_NAME_LEN {
                        return None;
                    }
                    labels.push(label.to_vec());
                    at += 1 + len as usize;
                }
                0xc0 => {
                    let low = *self.buf.get(at + 1)?;
                    let target = (((len & 0x3f) as usize) << 8) | low as usize;
                    if target >= at {
                        return None;
                    }
                    resume.get_or_insert(at + 2);
                    at = target;
                }
                // 0x40 (extended label types) and 0x80 are not in use.
                _ => return None,
            }
        }
    }

    fn name_is_root(&mut self) -> Option<bool> {
        Some(self.name()?.is_empty())
    }

    fn question(&mut self) -> Option<Question> {
        let labels = self.name()?;
        let qtype = self.u16()?;
        let qclass = self.u16()?;
        Some(Question {
            labels,
            qtype,
            qclass,
        })
    }

    /// Type, class and TTL of a record whose owner was just read; its rdata
    /// is skipped (nothing a query carries needs reading, OPT options
    /// included).
    fn record_tail(&mut self) -> Option<(u16, u16, u32)> {
        let rtype = self.u16()?;
        let rclass = self.u16()?;
        let ttl = self.u32()?;
        let len = self.u16()? as usize;
        self.buf.get(self.pos..self.pos + len)?;
        self.pos += len;
        Some((rtype, rclass, ttl))
    }

    fn skip_record(&mut self) -> Option<()> {
        self.name()?;
        self.record_tail()?;
        Some(())
    }
}

/// Lowercased dotted form of `labels` for zone lookup, or `None` when a
/// label holds a byte no zone name can contain (`.` would otherwise merge
/// labels; non-ASCII cannot match the builder's names either).
pub(crate) fn lookup_key(labels: &[Vec<u8>]) -> Option<String> {
    let mut key = String::with_capacity(labels.iter().map(|l| l.len() + 1).sum());
    for (i, label) in labels.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        for &b in label {
            if b == b'.' || !b.is_ascii_graphic() {
                return None;
            }
            key.push(b.to_ascii_lowercase() as char);
        }
    }
    Some(key)
}

/// Encode a dotted name (no trailing dot) uncompressed.
pub(crate) fn encode_name(dotted: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(dotted.len() + 2);
    for label in dotted.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// Builds a reply in place. Records are only appended whole: `fits` is
/// checked first, so a reply cut at the size limit is still well formed,
/// and compression pointers only ever point backwards into what was kept.
pub(crate) struct Writer {
    pub buf: Vec<u8>,
    counts: [u16; 3],
}

/// The three record sections after the question.
#[derive(Clone, Copy)]
pub(crate) enum Section {
    Answer = 0,
    Authority = 1,
    Additional = 2,
}

impl Writer {
    /// Header for a reply to `h`; flags beyond those echoed are set later.
    pub fn new(h: &Header, capacity: usize) -> Writer {
        let mut buf = Vec::with_capacity(capacity);
        buf.extend_from_slice(&h.id.to_be_bytes());
        buf.push(0x80 | (h.opcode << 3) | u8::from(h.rd));
        buf.push(if h.cd { 0x10 } else { 0 });
        buf.extend_from_slice(&[0; 8]);
        Writer {
            buf,
            counts: [0; 3],
        }
    }

    pub fn set_authoritative(&mut self) {
        self.buf[2] |= 0x04;
    }

    pub fn set_truncated(&mut self) {
        self.buf[2] |= 0x02;
    }

    pub fn set_rcode(&mut self, rcode: Rcode) {
        self.buf[3] = (self.buf[3] & 0xf0) | rcode.header_bits();
    }

    /// Echo the question; returns the offset of each label so later names
    /// can point at any suffix of it.
    pub fn question(&mut self, q: &Question) -> Vec<u16> {
        let mut offsets = Vec::with_capacity(q.labels.len());
        for label in &q.labels {
            offsets.push(self.buf.len() as u16);
            self.buf.push(label.len() as u8);
            self.buf.extend_from_slice(label);
        }
        self.buf.push(0);
        self.buf.extend_from_slice(&q.qtype.to_be_bytes());
        self.buf.extend_from_slice(&q.qclass.to_be_bytes());
        self.buf[4..6].copy_from_slice(&1u16.to_be_bytes());
        offsets
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// A point to come back to if what follows does not fit.
    pub fn mark(&self) -> (usize, [u16; 3]) {
        (self.buf.len(), self.counts)
    }

    pub fn rollback(&mut self, (len, counts): (usize, [u16; 3])) {
        self.buf.truncate(len);
        self.counts = counts;
    }

    /// Append one record owned by the name at `owner` (a compression
    /// pointer, so below 0x4000). `rdata` writes the record data; its
    /// length is measured.
    pub fn record(
        &mut self,
        section: Section,
        owner: u16,
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Vec<u8>),
    ) {
        self.buf.extend_from_slice(&(0xc000 | owner).to_be_bytes());
        self.record_tail(section, rtype, ttl, rdata);
    }

    /// Like [`Writer::record`], with the owner written out in full (`wire`
    /// is an uncompressed name).
    pub fn record_named(
        &mut self,
        section: Section,
        wire: &[u8],
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Vec<u8>),
    ) {
        self.buf.extend_from_slice(wire);
        self.record_tail(section, rtype, ttl, rdata);
    }

    fn record_tail(
        &mut self,
        section: Section,
        rtype: u16,
        ttl: u32,
        rdata: impl FnOnce(&mut Vec<u8>),
    ) {
        self.buf.extend_from_slice(&rtype.to_be_bytes());
        self.buf.extend_from_slice(&class::IN.to_be_bytes());
        self.buf.extend_from_slice(&ttl.to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        rdata(&mut self.buf);
        let rdlen = (self.buf.len() - len_at - 2) as u16;
        self.buf[len_at..len_at + 2].copy_from_slice(&rdlen.to_be_bytes());
        self.counts[section as usize] += 1;
    }

    /// The OPT record of a reply to an EDNS query (RFC 6891 §6.1.3); carries
    /// the extended rcode bits.
    pub fn opt(&mut self, payload: u16, rcode: Rcode, dnssec_ok: bool) {
        self.buf.push(0);
        self.buf.extend_from_slice(&rtype::OPT.to_be_bytes());
        self.buf.extend_from_slice(&payload.to_be_bytes());
        self.buf.push(rcode.extended_bits());
        self.buf.push(0); // version 0
        self.buf.push(if dnssec_ok { 0x80 } else { 0 });
        self.buf.push(0);
        self.buf.extend_from_slice(&[0, 0]);
        self.counts[Section::Additional as usize] += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        for (i, c) in self.counts.iter().enumerate() {
            self.buf[6 + 2 * i..8 + 2 * i].copy_from_slice(&c.to_be_bytes());
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(encode_name(name));
        q.extend(qtype.to_be_bytes());
        q.extend(class::IN.to_be_bytes());
        q
    }

    #[test]
    fn decodes_a_plain_query() {
        let q = query("Web.Shop.berth", rtype::SRV);
        let h = Header::parse(&q).unwrap();
        assert_eq!((h.id, h.qr, h.rd, h.qdcount), (0x1234, false, true, 1));
        let body = parse_body(&q, &h).unwrap();
        assert_eq!(lookup_key(&body.question.labels).unwrap(), "web.shop.berth");
        assert_eq!(body.question.qtype, rtype::SRV);
        assert_eq!(body.edns, None);
    }

    #[test]
    fn decodes_edns() {
        let mut q = query("web.berth", rtype::A);
        q[11] = 1;
        // root, OPT, payload 4096, ext-rcode 0, version 0, DO, rdlen 0
        q.extend([0, 0, 41, 0x10, 0x00, 0, 0, 0x80, 0, 0, 0]);
        let h = Header::parse(&q).unwrap();
        let edns = parse_body(&q, &h).unwrap().edns.unwrap();
        assert_eq!(
            edns,
            Edns {
                payload: 4096,
                version: 0,
                dnssec_ok: true
            }
        );
    }

    #[test]
    fn rejects_two_opt_records_and_trailing_bytes() {
        let mut q = query("web.berth", rtype::A);
        q[11] = 2;
        for _ in 0..2 {
            q.extend([0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
        }
        let h = Header::parse(&q).unwrap();
        assert!(parse_body(&q, &h).is_err());

        let mut q = query("web.berth", rtype::A);
        q.push(0);
        let h = Header::parse(&q).unwrap();
        assert!(parse_body(&q, &h).unwrap_err().question.is_some());
    }

    #[test]
    fn compression_pointers_must_point_backwards() {
        // The question's name is a pointer to itself: a loop.
        let mut q = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
        let h = Header::parse(&q).unwrap();
        assert!(parse_body(&q, &h).is_err());
        // A forward pointer into the answer section.
        q = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 18, 0, 1, 0, 1, 0];
        let h = Header::parse(&q).unwrap();
        assert!(parse_body(&q, &h).is_err());
    }

    #[test]
    fn a_name_longer_than_255_bytes_is_malformed() {
        let long = vec!["a".repeat(63); 5].join(".");
        let q = query(&long, rtype::A);
        let h = Header::parse(&q).unwrap();
        assert!(parse_body(&q, &h).is_err());
    }

    #[test]
    fn lookup_key_refuses_dots_inside_labels() {
        assert_eq!(lookup_key(&[b"a.b".to_vec(), b"berth".to_vec()]), None);
        assert_eq!(lookup_key(&[b"A-b_".to_vec()]).as_deref(), Some("a-b_"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(20_000))]

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Some(h) = Header::parse(&bytes) {
                let _ = parse_body(&bytes, &h);
            }
        }

        /// Valid queries with random tails: mutations of a real query reach
        /// deeper into the decoder than uniformly random bytes do.
        #[test]
        fn decoder_never_panics_on_mutated_queries(
            flips in proptest::collection::vec((0usize..64, any::<u8>()), 0..6),
            tail in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut q = query("web.shop.default.berth", rtype::SRV);
            q.extend(tail);
            for (i, b) in flips {
                if let Some(x) = q.get_mut(i) { *x = b; }
            }
            if let Some(h) = Header::parse(&q) {
                let _ = parse_body(&q, &h);
            }
        }
    }
}
