//! Queries per second of the DNS server over UDP on 127.0.0.1, with the
//! load generator in this same process (so it shares the cores with the
//! server: the figures are a floor, not a ceiling).
//!
//! `cargo run --release -p berth-net --example dns_bench -- [SECONDS] [CLIENTS]`
//!
//! Each client is a task with its own connected UDP socket sending one
//! query, waiting for the reply, and sending the next (closed loop), over a
//! mix of A (short form), SRV (full form, with additional records) and
//! NXDOMAIN queries against a zone of 50 services × 4 instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_net::dns::{DnsServer, Instance, Zone};
use tokio::net::UdpSocket;
use tokio::sync::watch;

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, qtype as u8, 0, 1]);
    q
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(5);
    let clients: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(16);

    let mut zone = Zone::builder();
    for s in 0..50u16 {
        for i in 1..=4u16 {
            zone.push(
                "default",
                "shop",
                format!("svc{s}"),
                Instance {
                    instance: format!("svc{s}.{i}"),
                    addr: format!("10.0.{s}.{i}").parse()?,
                    port: Some(5000 + i),
                    node: "n1".into(),
                },
            );
        }
    }
    let server = DnsServer::bind("127.0.0.1:0".parse()?).await?;
    let addr = server.udp_addr()?;
    let metrics = server.metrics();
    let (_zone_tx, zone_rx) = watch::channel(Arc::new(zone.build()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let served = tokio::spawn(server.run(zone_rx, stop_rx));

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        tasks.push(tokio::spawn(async move {
            let sock = UdpSocket::bind("127.0.0.1:0").await?;
            sock.connect(addr).await?;
            let queries = [
                query(c as u16, &format!("svc{}.berth", c % 50), 1),
                query(c as u16, &format!("svc{}.shop.default.berth", c % 50), 33),
                query(c as u16, "nope.shop.default.berth", 1),
            ];
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut lost = 0u64;
            let mut buf = [0u8; 1500];
            let mut n = 0usize;
            while Instant::now() < deadline {
                let t = Instant::now();
                sock.send(&queries[n % queries.len()]).await?;
                match tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await {
                    Ok(r) => {
                        r?;
                        latencies.push(t.elapsed().as_micros() as u32);
                    }
                    Err(_) => lost += 1,
                }
                n += 1;
            }
            Ok::<_, std::io::Error>((latencies, lost))
        }));
    }
    let mut all = Vec::new();
    let mut lost = 0;
    for t in tasks {
        let (l, x) = t.await??;
        all.extend(l);
        lost += x;
    }
    stop_tx.send_replace(true);
    served.await?;

    all.sort_unstable();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)));
    println!(
        "{} clients, {}s: {} answers, {:.0} queries/s, {} lost; latency p50 {:?} µs, p99 {:?} µs, max {:?} µs",
        clients,
        seconds,
        all.len(),
        all.len() as f64 / seconds as f64,
        lost,
        pct(0.50),
        pct(0.99),
        all.last(),
    );
    println!("{:?}", metrics.snapshot());
    Ok(())
}
