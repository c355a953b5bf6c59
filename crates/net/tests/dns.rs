//! The DNS server over real sockets on 127.0.0.1, queried by the real `dig`
//! (Debian's dnsutils) and, for what dig will not send, by raw UDP/TCP.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_net::dns::{DnsMetrics, DnsServer, Instance, Zone, ZoneBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

// ---------- harness ----------

struct Dns {
    addr: SocketAddr,
    zone: watch::Sender<Arc<Zone>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    metrics: DnsMetrics,
}

async fn start(zone: Zone) -> Dns {
    start_with(zone, None).await
}

async fn start_with(zone: Zone, ttl: Option<u32>) -> Dns {
    let mut server = DnsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    if let Some(ttl) = ttl {
        server = server.with_ttl(ttl).unwrap();
    }
    let addr = server.udp_addr().unwrap();
    assert_eq!(
        server.tcp_addr().unwrap(),
        addr,
        "UDP and TCP share the port"
    );
    let metrics = server.metrics();
    let (zone_tx, zone_rx) = watch::channel(Arc::new(zone));
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(server.run(zone_rx, stop_rx));
    Dns {
        addr,
        zone: zone_tx,
        stop: stop_tx,
        task,
        metrics,
    }
}

fn inst(name: &str, addr: &str, port: u16) -> Instance {
    Instance {
        instance: name.into(),
        addr: addr.parse().unwrap(),
        port: Some(port),
        node: "n1".into(),
    }
}

/// `web` in stack `shop` with three instances, `db` with an IPv6 one, and
/// `web` in namespace `staging`.
fn shop() -> ZoneBuilder {
    Zone::builder()
        .instance("default", "shop", "web", inst("web.1", "10.0.0.1", 5001))
        .instance("default", "shop", "web", inst("web.2", "10.0.0.2", 5002))
        .instance("default", "shop", "web", inst("web.3", "10.0.0.3", 5003))
        .instance("default", "shop", "db", inst("db.1", "fd00::5", 5432))
        .instance("staging", "shop", "web", inst("web.1", "10.9.0.1", 6001))
}

/// dig's answer, parsed from its default output.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answer: Vec<Vec<String>>,
    authority: Vec<Vec<String>>,
    additional: Vec<Vec<String>>,
    raw: String,
}

impl Dig {
    fn has_flag(&self, f: &str) -> bool {
        self.flags.iter().any(|x| x == f)
    }

    /// The rdata (fields after the type) of answer records of `rtype`.
    fn rdata(&self, rtype: &str) -> BTreeSet<String> {
        self.answer
            .iter()
            .filter(|r| r[3] == rtype)
            .map(|r| r[4..].join(" "))
            .collect()
    }
}

async fn dig(addr: SocketAddr, args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        // One try (tests count queries), with time for a loaded machine.
        .args(["+tries=1", "+time=10"])
        .args(args)
        .output()
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`dig` is not installed: these tests query the DNS server with the real dig; \
             install Debian's dnsutils (`apt-get install dnsutils`)"
        ),
        Err(e) => panic!("cannot run dig: {e}"),
    };
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} failed: {raw}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_dig(raw)
}

fn parse_dig(raw: String) -> Dig {
    let mut d = Dig {
        status: String::new(),
        flags: Vec::new(),
        answer: Vec::new(),
        authority: Vec::new(),
        additional: Vec::new(),
        raw: String::new(),
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if line.starts_with(";; ") && line.ends_with("SECTION:") {
            section = line;
        } else if line.is_empty() {
            section = "";
        } else if !line.starts_with(';') {
            let fields = line.split_whitespace().map(String::from).collect();
            match section {
                ";; ANSWER SECTION:" => d.answer.push(fields),
                ";; AUTHORITY SECTION:" => d.authority.push(fields),
                ";; ADDITIONAL SECTION:" => d.additional.push(fields),
                _ => {}
            }
        }
    }
    d.raw = raw;
    d
}

fn set<const N: usize>(items: [&str; N]) -> BTreeSet<String> {
    items.into_iter().map(String::from).collect()
}

// ---------- answers ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_records_are_the_healthy_instances_authoritative_ttl_0() {
    let dns = start(shop().build()).await;
    let d = dig(dns.addr, &["web.shop.default.berth", "A"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.has_flag("aa"), "{}", d.raw);
    assert_eq!(d.rdata("A"), set(["10.0.0.1", "10.0.0.2", "10.0.0.3"]));
    assert!(
        d.answer.iter().all(|r| r[1] == "0" && r[2] == "IN"),
        "TTL 0: {}",
        d.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aaaa_for_ipv6_instances() {
    let dns = start(shop().build()).await;
    let d = dig(dns.addr, &["db.shop.default.berth", "AAAA"]).await;
    assert_eq!(d.rdata("AAAA"), set(["fd00::5"]), "{}", d.raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_lists_exactly_the_healthy_instances_with_addresses_in_additional() {
    let dns = start(shop().build()).await;
    // The acceptance command, verbatim but for the port.
    let d = dig(dns.addr, &["web.shop.default.berth", "SRV"]).await;
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(
        d.rdata("SRV"),
        set([
            "1 1 5001 1.web.shop.default.berth.",
            "1 1 5002 2.web.shop.default.berth.",
            "1 1 5003 3.web.shop.default.berth.",
        ])
    );
    let additional: BTreeSet<String> = d
        .additional
        .iter()
        .filter(|r| r[3] == "A")
        .map(|r| format!("{} {}", r[0], r[4]))
        .collect();
    assert_eq!(
        additional,
        set([
            "1.web.shop.default.berth. 10.0.0.1",
            "2.web.shop.default.berth. 10.0.0.2",
            "3.web.shop.default.berth. 10.0.0.3",
        ])
    );
    // The SRV targets resolve on their own too.
    let t = dig(dns.addr, &["2.web.shop.default.berth", "A"]).await;
    assert_eq!(t.rdata("A"), set(["10.0.0.2"]));
    let v6 = dig(dns.addr, &["db.shop.default.berth", "SRV"]).await;
    assert_eq!(
        v6.additional.iter().filter(|r| r[3] == "AAAA").count(),
        1,
        "{}",
        v6.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_forms_and_case_insensitivity() {
    let zone = shop()
        .instance("default", "blog", "web", inst("web.1", "10.1.0.1", 7001))
        .build();
    let dns = start(zone).await;
    let shop_web = set(["10.0.0.1", "10.0.0.2", "10.0.0.3"]);
    assert_eq!(
        dig(dns.addr, &["web.shop.berth", "A"]).await.rdata("A"),
        shop_web
    );
    assert_eq!(
        dig(dns.addr, &["WEB.Shop.Default.BERTH.", "A"])
            .await
            .rdata("A"),
        shop_web
    );
    // `web.berth`: namespace default, every stack with a `web` (documented union).
    let union = dig(dns.addr, &["web.berth", "A"]).await;
    assert_eq!(
        union.rdata("A"),
        set(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.1.0.1"])
    );
    // Namespaces stay apart: the short forms are namespace default only.
    let staging = dig(dns.addr, &["web.shop.staging.berth", "A"]).await;
    assert_eq!(staging.rdata("A"), set(["10.9.0.1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc2782_service_names() {
    let dns = start(shop().build()).await;
    for name in ["_web._tcp.shop.default.berth", "_web._tcp.shop.berth"] {
        let d = dig(dns.addr, &[name, "SRV"]).await;
        assert_eq!(d.rdata("SRV").len(), 3, "{name}: {}", d.raw);
        assert_eq!(d.additional.iter().filter(|r| r[3] == "A").count(), 3);
    }
    // `_service._tcp` names own SRV records only.
    let d = dig(dns.addr, &["_web._tcp.shop.berth", "A"]).await;
    assert_eq!(
        (d.status.as_str(), d.answer.len()),
        ("NOERROR", 0),
        "{}",
        d.raw
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_nxdomain_with_soa() {
    let dns = start(shop().build()).await;
    for name in [
        "api.shop.default.berth",
        "web.nope.default.berth",
        "x.berth",
    ] {
        let d = dig(dns.addr, &[name, "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{name}: {}", d.raw);
        assert!(d.has_flag("aa"));
        assert_eq!(d.authority.len(), 1);
        assert_eq!(&d.authority[0][..4], ["berth.", "0", "IN", "SOA"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_names_without_the_type_are_nodata() {
    let dns = start(shop().build()).await;
    // web is IPv4 only; `shop.default.berth` is an empty non-terminal; TXT
    // is a type we never have.
    for (name, t) in [
        ("web.shop.default.berth", "AAAA"),
        ("shop.default.berth", "A"),
        ("web.shop.berth", "TXT"),
    ] {
        let d = dig(dns.addr, &[name, t]).await;
        assert_eq!(d.status, "NOERROR", "{name} {t}: {}", d.raw);
        assert!(d.answer.is_empty(), "{}", d.raw);
        assert_eq!(d.authority.len(), 1, "{}", d.raw);
        assert_eq!(d.authority[0][3], "SOA");
    }
    let soa = dig(dns.addr, &["berth", "SOA"]).await;
    assert_eq!(soa.answer.len(), 1, "{}", soa.raw);
    assert_eq!(soa.answer[0][4..6], ["ns.berth.", "hostmaster.berth."]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_zone_are_refused() {
    let dns = start(shop().build()).await;
    for name in ["example.com", "berth.example.com", "."] {
        let d = dig(dns.addr, &[name, "A"]).await;
        assert_eq!(d.status, "REFUSED", "{name}: {}", d.raw);
        assert!(!d.has_flag("aa"));
        assert!(d.answer.is_empty());
    }
    let axfr = dig(dns.addr, &["berth", "AXFR"]).await;
    assert!(axfr.raw.contains("Transfer failed"), "{}", axfr.raw);
    assert!(dns.metrics.snapshot().by_rcode.refused >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries() {
    let dns = start(shop().build()).await;
    let d = dig(dns.addr, &["+tcp", "web.shop.default.berth", "SRV"]).await;
    assert_eq!(d.rdata("SRV").len(), 3, "{}", d.raw);
    assert!(d.raw.contains("(TCP)"), "{}", d.raw);
    assert_eq!(dns.metrics.snapshot().tcp_queries, 1);

    // Several queries pipelined on one connection are all answered, in order.
    let mut s = TcpStream::connect(dns.addr).await.unwrap();
    let mut batch = Vec::new();
    for id in 1..=3u16 {
        let q = raw_query(id, "web.shop.berth", 1);
        batch.extend((q.len() as u16).to_be_bytes());
        batch.extend(q);
    }
    s.write_all(&batch).await.unwrap();
    for id in 1..=3u16 {
        let mut len = [0; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut reply = vec![0; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(u16::from_be_bytes([reply[0], reply[1]]), id);
        assert_eq!(
            u16::from_be_bytes([reply[6], reply[7]]),
            3,
            "three A records"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_answers_truncate_over_udp_and_come_whole_over_tcp() {
    let mut b = Zone::builder();
    for i in 1..=40u16 {
        b.push(
            "default",
            "shop",
            "web",
            inst(&format!("web.{i}"), &format!("10.0.1.{i}"), 5000 + i),
        );
    }
    let dns = start(b.build()).await;

    let cut = dig(
        dns.addr,
        &["+noedns", "+ignore", "web.shop.default.berth", "SRV"],
    )
    .await;
    assert!(cut.has_flag("tc"), "{}", cut.raw);
    assert!(
        !cut.answer.is_empty() && cut.answer.len() < 40,
        "whole records that fit: {}",
        cut.raw
    );
    assert!(cut.additional.is_empty());

    let tcp = dig(dns.addr, &["+tcp", "web.shop.default.berth", "SRV"]).await;
    assert!(!tcp.has_flag("tc"));
    assert_eq!(tcp.rdata("SRV").len(), 40);
    assert_eq!(tcp.additional.iter().filter(|r| r[3] == "A").count(), 40);

    // dig's own EDNS (1232 bytes) is not enough for 40 SRV records either:
    // left to itself, dig sees TC and retries over TCP.
    let auto = dig(dns.addr, &["web.shop.default.berth", "SRV"]).await;
    assert!(
        auto.raw.contains("Truncated, retrying in TCP mode"),
        "{}",
        auto.raw
    );
    assert_eq!(auto.rdata("SRV").len(), 40);

    // A records fit in 1232 bytes with EDNS but not in 512 without.
    let a = dig(dns.addr, &["web.shop.default.berth", "A"]).await;
    assert!(!a.has_flag("tc") && a.answer.len() == 40, "{}", a.raw);
    let a = dig(
        dns.addr,
        &["+noedns", "+ignore", "web.shop.default.berth", "A"],
    )
    .await;
    assert!(a.has_flag("tc") && a.answer.len() < 40, "{}", a.raw);
    assert!(dns.metrics.snapshot().truncated >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_update_is_in_the_next_answer() {
    let dns = start(shop().build()).await;
    let before = dig(dns.addr, &["web.shop.default.berth", "SRV"]).await;
    assert_eq!(before.rdata("SRV").len(), 3);

    // web.2 fails its health check: the server publishes a zone without it.
    let zone = Zone::builder()
        .instance("default", "shop", "web", inst("web.1", "10.0.0.1", 5001))
        .instance("default", "shop", "web", inst("web.3", "10.0.0.3", 5003))
        .build();
    dns.zone.send_replace(Arc::new(zone));
    let after = dig(dns.addr, &["web.shop.default.berth", "SRV"]).await;
    assert_eq!(
        after.rdata("SRV"),
        set([
            "1 1 5001 1.web.shop.default.berth.",
            "1 1 5003 3.web.shop.default.berth."
        ])
    );
    let gone = dig(dns.addr, &["2.web.shop.default.berth", "A"]).await;
    assert_eq!(gone.status, "NXDOMAIN");

    // The last instance goes: the service's names go with it.
    dns.zone.send_replace(Arc::new(Zone::builder().build()));
    assert_eq!(
        dig(dns.addr, &["web.shop.berth", "A"]).await.status,
        "NXDOMAIN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_is_configurable_up_to_5_seconds() {
    let dns = start_with(shop().build(), Some(5)).await;
    let d = dig(dns.addr, &["web.shop.berth", "A"]).await;
    assert!(d.answer.iter().all(|r| r[1] == "5"), "{}", d.raw);
    let server = DnsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let err = server.with_ttl(6).err().unwrap();
    assert!(err.to_string().contains("at most 5s"), "{err}");
}

// ---------- hostile input ----------

fn raw_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, qtype as u8, 0, 1]);
    q
}

/// Send `q`, and the reply if one comes within `wait`.
async fn udp_exchange(
    sock: &UdpSocket,
    to: SocketAddr,
    q: &[u8],
    wait: Duration,
) -> Option<Vec<u8>> {
    sock.send_to(q, to).await.unwrap();
    let mut buf = vec![0; 2048];
    match tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_queries_get_formerr_and_garbage_is_survived() {
    let dns = start(shop().build()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // An answer that must come may take a while on a loaded machine; one
    // that must not come is waited for briefly (it could only come late).
    let answer = Duration::from_secs(10);

    // Two questions: FORMERR, id echoed.
    let mut two = raw_query(7, "web.berth", 1);
    two[5] = 2;
    let r = udp_exchange(&sock, dns.addr, &two, answer).await.unwrap();
    assert_eq!((r[0], r[1], r[3] & 0x0f), (0, 7, 1));
    // A name that runs past the end of the packet: FORMERR.
    let r = udp_exchange(
        &sock,
        dns.addr,
        &[0, 8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9, b'w'],
        answer,
    )
    .await
    .unwrap();
    assert_eq!((r[1], r[3] & 0x0f), (8, 1));
    // EDNS version 1: BADVERS (extended rcode 1 in the OPT record).
    let mut v1 = raw_query(9, "web.berth", 1);
    v1[11] = 1;
    v1.extend([0, 0, 41, 4, 0, 0, 1, 0, 0, 0, 0]);
    let r = udp_exchange(&sock, dns.addr, &v1, answer).await.unwrap();
    assert_eq!((r[3] & 0x0f, r[r.len() - 6]), (0, 1), "{r:?}");
    // A response is never answered (no reflection loops).
    let mut resp = raw_query(10, "web.berth", 1);
    resp[2] |= 0x80;
    assert_eq!(
        udp_exchange(&sock, dns.addr, &resp, Duration::from_millis(300)).await,
        None
    );

    // Random bytes, and real queries with random bytes flipped: a reply, if
    // any, carries the query's id.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let template = raw_query(0, "web.shop.default.berth", 33);
    for i in 0..3000 {
        let mut p: Vec<u8> = if i % 2 == 0 {
            (0..next() % 80).map(|_| next() as u8).collect()
        } else {
            let mut t = template.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % t.len();
                t[at] = next() as u8;
            }
            t
        };
        if p.len() >= 2 {
            p[0] = 0xee;
            p[1] = 0xee;
        }
        sock.send_to(&p, dns.addr).await.unwrap();
        if i % 100 == 99 {
            // Pace the flood so the kernel's socket buffer does not drop
            // datagrams: every one of them must reach the decoder.
            let want = 4 + i as u64 + 1;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                let got = dns.metrics.snapshot().udp_queries;
                if got >= want {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the server decoded {got} of {want} datagrams within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
    // Drain whatever came back; every reply is to one of ours.
    let mut buf = vec![0; 2048];
    while let Ok(Ok((n, _))) =
        tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf)).await
    {
        assert!(n >= 12 && buf[..2] == [0xee, 0xee], "{:?}", &buf[..n]);
    }
    // Garbage over TCP: the connection is answered or closed, never hung.
    for len in [0usize, 1, 5, 12, 40] {
        let mut s = TcpStream::connect(dns.addr).await.unwrap();
        let mut frame = (len as u16).to_be_bytes().to_vec();
        frame.extend((0..len).map(|_| next() as u8));
        s.write_all(&frame).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let mut b = [0u8; 512];
            while let Ok(n @ 1..) = s.read(&mut b).await {
                out.extend_from_slice(&b[..n]);
                if out.len() >= 2 && out.len() >= 2 + u16::from_be_bytes([out[0], out[1]]) as usize
                {
                    break;
                }
            }
        })
        .await;
    }

    // Still serving, and the counters saw it all.
    let d = dig(dns.addr, &["web.shop.default.berth", "SRV"]).await;
    assert_eq!(d.rdata("SRV").len(), 3);
    let m = dns.metrics.snapshot();
    assert!(m.udp_queries >= 3004, "{m:?}");
    assert!(m.by_rcode.formerr > 100 && m.dropped > 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_both_listeners() {
    let dns = start(shop().build()).await;
    assert!(TcpStream::connect(dns.addr).await.is_ok());
    dns.stop.send_replace(true);
    tokio::time::timeout(Duration::from_secs(5), dns.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(dns.addr).await.is_err(),
        "TCP listener closed"
    );
    // The UDP port is free again.
    UdpSocket::bind(dns.addr).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_by_type_and_rcode() {
    let dns = start(shop().build()).await;
    dig(dns.addr, &["web.shop.berth", "A"]).await;
    dig(dns.addr, &["web.shop.berth", "SRV"]).await;
    dig(dns.addr, &["db.shop.berth", "AAAA"]).await;
    dig(dns.addr, &["nope.berth", "A"]).await;
    let m = dns.metrics.snapshot();
    assert_eq!(
        (m.by_type.a, m.by_type.srv, m.by_type.aaaa),
        (2, 1, 1),
        "{m:?}"
    );
    assert_eq!((m.by_rcode.noerror, m.by_rcode.nxdomain), (3, 1), "{m:?}");
}
