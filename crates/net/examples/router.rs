//! A standalone router for benchmarks and manual tests: every request, for
//! any host, goes to the given backends.
//!
//! ```text
//! cargo run --release -p berth-net --example router -- \
//!     --listen 127.0.0.1:8080 --backend 127.0.0.1:5000 [--backend …] \
//!     [--policy rr|least] [--threads N] [--access-log] [--work-stealing]
//! ```
//!
//! By default it serves from one single-threaded runtime per thread
//! ([`Router::serve_on_threads`]); `--work-stealing` serves one listener
//! from Tokio's multi-threaded runtime instead, for comparison.

use std::collections::HashMap;
use std::net::SocketAddr;

use berth_net::http::{
    Backend, LbPolicy, Route, RouteTable, Router, RouterConfig, ServiceBackends, ServiceId,
};

// As in the berth binary: a request allocates and frees many small
// buffers, which mimalloc's per-thread free lists serve faster than glibc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    listen: SocketAddr,
    backends: Vec<SocketAddr>,
    policy: LbPolicy,
    threads: Option<usize>,
    access_log: bool,
    work_stealing: bool,
}

fn parse() -> Result<Args, String> {
    let mut listen = None;
    let mut backends = Vec::new();
    let mut policy = LbPolicy::RoundRobin;
    let mut threads = None;
    let mut access_log = false;
    let mut work_stealing = false;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--backend" => backends.push(value()?.parse().map_err(|e| format!("--backend: {e}"))?),
            "--policy" => {
                policy = match value()?.as_str() {
                    "rr" => LbPolicy::RoundRobin,
                    "least" => LbPolicy::LeastRequests,
                    p => return Err(format!("--policy: unknown policy {p} (rr or least)")),
                }
            }
            "--threads" => threads = Some(value()?.parse().map_err(|e| format!("--threads: {e}"))?),
            "--access-log" => access_log = true,
            "--work-stealing" => work_stealing = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let listen = listen.ok_or("--listen ADDR is required")?;
    if backends.is_empty() {
        return Err("at least one --backend ADDR is required".into());
    }
    Ok(Args {
        listen,
        backends,
        policy,
        threads,
        access_log,
        work_stealing,
    })
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("router: {e}");
            std::process::exit(2);
        }
    };
    let mut rt = if args.work_stealing {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = args.threads {
            b.worker_threads(n);
        }
        b
    } else {
        // Only the route-table follower runs here; requests run on the
        // router's own threads.
        tokio::runtime::Builder::new_current_thread()
    };
    rt.enable_all();
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("router: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("router: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    if args.access_log {
        tracing_subscriber::fmt().with_target(true).init();
    }
    let id = ServiceId::new("default", "bench", "web");
    let service = ServiceBackends {
        backends: args
            .backends
            .iter()
            .enumerate()
            .map(|(i, addr)| Backend {
                addr: *addr,
                id: format!("web-{i}"),
            })
            .collect(),
        policy: args.policy,
        max_concurrent: None,
        retries: 1,
    };
    let table = RouteTable::new(
        vec![Route::host("*", id.clone())],
        HashMap::from([(id, service)]),
    );
    let (_tx, rx) = tokio::sync::watch::channel(table);
    let router = Router::new(rx, RouterConfig::default());
    if !args.work_stealing {
        let threads = args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = router.serve_on_threads(args.listen, threads, stop_rx)?;
        eprintln!(
            "router listening on {} ({threads} threads)",
            server.local_addr()
        );
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true);
        return tokio::task::spawn_blocking(move || server.join())
            .await
            .map_err(std::io::Error::other)?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("router listening on {}", args.listen);
    router
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
