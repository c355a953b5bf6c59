//! Discovery propagation, measured with real processes: how long after an
//! instance's health check passes does the router send it its first request,
//! and how long after its check fails does the router send it its last.
//!
//! ```text
//! cargo build --release -p berth-cli -p berth-net --example propagation
//! target/release/examples/propagation --berth target/release/berth [--cycles 40] [--conns 8]
//! ```
//!
//! The harness starts a private `berth server` (router on a free port, no
//! DNS), and `berth up` a stack whose two instances are this same binary in
//! `backend` mode. Both timestamps of a sample are taken inside the backend
//! process, on one monotonic clock: when it answered a health check (the
//! agent's HTTP probe, `GET /health`) and when routed requests (`GET /`
//! through the router, sent closed-loop by the harness on `--conns`
//! keep-alive connections) arrived. Each cycle flips one instance to
//! failing (`/health` answers 503; `retries: 1` makes one failure count)
//! and back:
//!
//! - down = last routed request − first 503 health answer;
//! - up = first routed request − first 200 health answer after recovery.
//!
//! The resolution is the gap between routed requests at one instance, which
//! the harness prints (the load is spread over two instances).
//!
//! `--hops` runs the server with `BERTH_LOG=info,berth_hops=debug` and
//! breaks each transition down along its path, from the server's
//! `berth_hops` events (wall clock, µs): the agent sees the probe result,
//! the route table is published, the router swaps in its compiled table,
//! and (off the path since the local overlay) the status write commits.
//! `--log PATH` keeps the server's log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("propagation: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = if args.first().map(String::as_str) == Some("backend") {
        rt.block_on(backend())
    } else {
        rt.block_on(harness(args))
    };
    if let Err(e) = result {
        eprintln!("propagation: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------- backend

/// What a backend instance has seen since its last flip (ns since start).
#[derive(Default)]
struct Marks {
    failing: bool,
    fail_at: Option<u64>,
    ok_at: Option<u64>,
    /// The same two moments on the wall clock (µs since the epoch), to line
    /// up with the server's `berth_hops` events (`--hops`).
    fail_wall: Option<u64>,
    ok_wall: Option<u64>,
    last_routed: Option<u64>,
    first_routed_after_ok: Option<u64>,
    routed: u64,
}

/// The instance: answers `/health` (200, or 503 while failing), `/`
/// (routed load), and the harness's `/control/*` requests.
async fn backend() -> Result<(), Error> {
    let port: u16 = std::env::var("PORT")?.parse()?;
    let dir = PathBuf::from(std::env::var("PROP_DIR")?);
    let instance = std::env::var("BERTH_INSTANCE").unwrap_or_else(|_| port.to_string());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    // Announce the port only once it is bound.
    std::fs::write(dir.join(format!("{instance}.port")), port.to_string())?;
    let epoch = Instant::now();
    let marks = Arc::new(Mutex::new(Marks::default()));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let marks = marks.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let marks = marks.clone();
                async move {
                    let now = u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    Ok::<_, Infallible>(answer(&marks, now, req.method(), req.uri().path()))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(marks: &Mutex<Marks>, now: u64, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let mut m = marks.lock().unwrap_or_else(|p| p.into_inner());
    let (status, body) = match (method, path) {
        (&Method::GET, "/health") if m.failing => {
            if m.fail_at.is_none() {
                m.fail_at = Some(now);
                m.fail_wall = Some(wall_us());
            }
            (StatusCode::SERVICE_UNAVAILABLE, String::new())
        }
        (&Method::GET, "/health") => {
            if m.ok_at.is_none() {
                m.ok_at = Some(now);
                m.ok_wall = Some(wall_us());
            }
            (StatusCode::OK, String::new())
        }
        (&Method::POST, "/control/fail") => {
            m.failing = true;
            m.fail_at = None;
            m.fail_wall = None;
            (StatusCode::OK, String::new())
        }
        (&Method::POST, "/control/recover") => {
            m.failing = false;
            m.ok_at = None;
            m.ok_wall = None;
            m.first_routed_after_ok = None;
            (StatusCode::OK, String::new())
        }
        (&Method::GET, "/control/report") => {
            let f = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            let text = format!(
                "{} {} {} {} {} {} {} {}",
                f(m.fail_at),
                f(m.last_routed),
                f(m.ok_at),
                f(m.first_routed_after_ok),
                now,
                m.routed,
                f(m.fail_wall),
                f(m.ok_wall),
            );
            (StatusCode::OK, text)
        }
        _ => {
            m.last_routed = Some(now);
            m.routed += 1;
            if m.ok_at.is_some() && m.first_routed_after_ok.is_none() && !m.failing {
                m.first_routed_after_ok = Some(now);
            }
            (StatusCode::OK, "ok".to_owned())
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

// ---------------------------------------------------------------- harness

struct Report {
    fail_at: Option<u64>,
    last_routed: Option<u64>,
    ok_at: Option<u64>,
    first_routed_after_ok: Option<u64>,
    now: u64,
    routed: u64,
    fail_wall: Option<u64>,
    ok_wall: Option<u64>,
}

impl Report {
    fn parse(s: &str) -> Result<Self, Error> {
        let v: Vec<Option<u64>> = s
            .split_whitespace()
            .map(|x| x.parse().ok())
            .collect::<Vec<_>>();
        if v.len() != 8 {
            return Err(format!("bad report {s:?}").into());
        }
        Ok(Self {
            fail_at: v[0],
            last_routed: v[1],
            ok_at: v[2],
            first_routed_after_ok: v[3],
            now: v[4].ok_or("report without a clock")?,
            routed: v[5].unwrap_or(0),
            fail_wall: v[6],
            ok_wall: v[7],
        })
    }
}

/// Kills and reaps the child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn harness(args: Vec<String>) -> Result<(), Error> {
    let mut berth = None;
    let mut cycles = 40usize;
    let mut conns = 8usize;
    let mut hops = false;
    let mut keep_log = None;
    let mut it = args.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--berth" => berth = Some(PathBuf::from(value()?)),
            "--cycles" => cycles = value()?.parse()?,
            "--conns" => conns = value()?.parse()?,
            "--hops" => hops = true,
            "--log" => keep_log = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let berth = berth.ok_or("--berth PATH (the berth binary) is required")?;
    let exe = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let ports_dir = tmp.path().join("ports");
    std::fs::create_dir_all(&ports_dir)?;
    let http = free_port()?;

    let berth_cmd = |args: &[&str]| {
        let mut c = Command::new(&berth);
        c.args(args)
            .env("BERTH_DATA_DIR", &data)
            .env("NO_COLOR", "1")
            .current_dir(tmp.path())
            .stdin(Stdio::null());
        c
    };
    let log_path = tmp.path().join("server.log");
    let log = std::fs::File::create(&log_path)?;
    let mut server = berth_cmd(&["server", "--http", &format!("127.0.0.1:{http}"), "--no-dns"]);
    if hops {
        server.env("BERTH_LOG", "info,berth_hops=debug");
    }
    let _server = Reaped(server.stdout(log.try_clone()?).stderr(log).spawn()?);
    std::fs::write(
        tmp.path().join("compose.yaml"),
        format!(
            concat!(
                "services:\n",
                "  web:\n",
                "    command: [{exe:?}, \"backend\"]\n",
                "    environment: {{ PROP_DIR: {dir:?} }}\n",
                "    ports: [\"8080\"]\n",
                "    deploy: {{ replicas: 2 }}\n",
                "    x-berth:\n",
                "      healthcheck: {{ http: /health, interval: 100ms, timeout: 500ms, retries: 1, start_interval: 50ms }}\n",
            ),
            exe = exe.display().to_string(),
            dir = ports_dir.display().to_string(),
        ),
    )?;
    wait_for("the server", Duration::from_secs(20), || {
        data.join("server.json").exists()
    })
    .await?;
    let out = berth_cmd(&["up", "-d", "-p", "prop"]).output()?;
    if !out.status.success() {
        return Err(format!(
            "berth up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let backends = read_ports(&ports_dir, 2).await?;
    eprintln!("instances on ports {backends:?}; router on {http}");

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..conns {
        load.push(tokio::spawn(closed_loop(
            http,
            stop.clone(),
            sent.clone(),
            errors.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut ups = Vec::new();
    let mut downs = Vec::new();
    // (wall µs of the health answer, wall µs of the routed request) per
    // transition, for the per-hop breakdown.
    let mut up_walls = Vec::new();
    let mut down_walls = Vec::new();
    let mut gaps = Vec::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        let port = backends[cycle % backends.len()];
        let before = report(port).await?;
        control(port, "/control/fail").await?;
        // Down: wait for the failing answer, then for routed requests to stop.
        let r = loop {
            let r = report(port).await?;
            if let (Some(_), Some(last)) = (r.fail_at, r.last_routed)
                && r.now.saturating_sub(last) > 300_000_000
            {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (fail_at, last) = (r.fail_at.unwrap_or(0), r.last_routed.unwrap_or(0));
        downs.push(last as f64 / 1e6 - fail_at as f64 / 1e6);
        if let Some(w) = r.fail_wall {
            let end = i128::from(w) + (i128::from(last) - i128::from(fail_at)) / 1000;
            down_walls.push((w, end));
        }
        if r.routed > before.routed {
            let span = r.now.saturating_sub(before.now) as f64 / 1e6;
            gaps.push(span / (r.routed - before.routed) as f64);
        }
        control(port, "/control/recover").await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let r = loop {
            let r = report(port).await?;
            if r.first_routed_after_ok.is_some() {
                break r;
            }
            if Instant::now() > deadline {
                return Err(format!("instance on {port} never got traffic back").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (ok_at, first) = (r.ok_at.unwrap_or(0), r.first_routed_after_ok.unwrap_or(0));
        ups.push(first as f64 / 1e6 - ok_at as f64 / 1e6);
        if let Some(w) = r.ok_wall {
            up_walls.push((
                w,
                i128::from(w) + (i128::from(first) - i128::from(ok_at)) / 1000,
            ));
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.await;
    }
    let _ = berth_cmd(&["down", "-p", "prop"]).output();

    let total = sent.load(Ordering::Relaxed);
    println!(
        "{cycles} cycles in {:.1} s; load {:.0} req/s on {conns} connections through the router, {} errors",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    println!(
        "resolution: median gap between routed requests at one instance {:.3} ms",
        percentile(&mut gaps, 50.0)
    );
    println!();
    println!("| transition | samples | p50 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, v) in [
        ("check passes → first routed request", &mut ups),
        ("check fails → last routed request", &mut downs),
    ] {
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            percentile(v, 50.0),
            percentile(v, 99.0),
            max
        );
    }
    if let Some(path) = &keep_log {
        std::fs::copy(&log_path, path)?;
    }
    if hops {
        for (name, walls) in [("passes", &up_walls), ("fails", &down_walls)] {
            if let Some((start, end)) = walls.iter().max_by_key(|(s, e)| e - i128::from(*s)) {
                eprintln!(
                    "slowest 'check {name}': health answer at {start} µs (wall), routed request {:.2} ms later",
                    (end - i128::from(*start)) as f64 / 1e3
                );
            }
        }
        let events = hop_events(&std::fs::read_to_string(&log_path)?);
        println!();
        println!("per hop, ms after the health answer (cumulative):");
        println!();
        println!("| transition | hop | samples | p50 ms | p99 ms | max ms |");
        println!("|---|---|---:|---:|---:|---:|");
        hop_table("passes", "healthy", &up_walls, &events);
        hop_table("fails", "unhealthy", &down_walls, &events);
    }
    Ok(())
}

/// `wall_us` of the backend's clock.
fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One `berth_hops` debug event of the server's log.
struct Hop {
    hop: String,
    health: Option<String>,
    at_us: u64,
}

/// The `berth_hops` events of a server log (tracing's default format:
/// `… DEBUG berth_hops: hop="probe" instance=… health=healthy at_us=…`).
fn hop_events(log: &str) -> Vec<Hop> {
    let mut out = Vec::new();
    for line in log.lines().filter(|l| l.contains("berth_hops:")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_owned())
        };
        let (Some(hop), Some(at)) = (field("hop="), field("at_us=")) else {
            continue;
        };
        if let Ok(at_us) = at.parse() {
            out.push(Hop {
                hop,
                health: field("health="),
                at_us,
            });
        }
    }
    out
}

/// For each transition (start = the health answer, end = the routed
/// request), the first event of each hop at or after its start and before
/// the next transition's start.
fn hop_table(name: &str, health: &str, walls: &[(u64, i128)], events: &[Hop]) {
    let order = ["probe", "tables", "router", "stored"];
    let mut all: Vec<(u64, i128)> = walls.to_vec();
    all.sort_unstable();
    let mut per_hop: Vec<Vec<f64>> = vec![Vec::new(); order.len() + 1];
    for (i, &(start, end)) in all.iter().enumerate() {
        let until = all.get(i + 1).map_or(u64::MAX, |n| n.0);
        for (h, hop) in order.iter().enumerate() {
            let first = events.iter().find(|e| {
                e.hop == *hop
                    && e.at_us >= start
                    && e.at_us < until
                    && e.health.as_deref().is_none_or(|x| x == health)
            });
            if let Some(e) = first {
                per_hop[h].push((e.at_us - start) as f64 / 1e3);
            }
        }
        per_hop[order.len()].push((end - i128::from(start)) as f64 / 1e3);
    }
    let labels = [
        "agent sees the check result",
        "route table published",
        "router swapped its table",
        "status committed to the store",
        "routed request at the instance",
    ];
    for (label, v) in labels.iter().zip(per_hop.iter_mut()) {
        let max = v.iter().copied().fold(f64::NAN, f64::max);
        println!(
            "| check {name} | {label} | {} | {:.2} | {:.2} | {:.2} |",
            v.len(),
            percentile(v, 50.0),
            percentile(v, 99.0),
            max
        );
    }
}

/// Nearest-rank percentile.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

async fn closed_loop(
    router: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(("127.0.0.1", router)).await else {
            errors.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            errors.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let req = Request::get("/")
                .header("host", "web.prop.localhost")
                .body(Empty::<Bytes>::new());
            let Ok(req) = req else { return };
            match tx.send_request(req).await {
                Ok(resp) => {
                    let ok = resp.status().is_success();
                    if resp.into_body().collect().await.is_err() || !ok {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

async fn request(port: u16, method: Method, path: &str) -> Result<String, Error> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1")
        .body(Empty::<Bytes>::new())?;
    let resp = tx.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn report(port: u16) -> Result<Report, Error> {
    Report::parse(&request(port, Method::GET, "/control/report").await?)
}

async fn control(port: u16, path: &str) -> Result<(), Error> {
    request(port, Method::POST, path).await.map(|_| ())
}

async fn read_ports(dir: &Path, n: usize) -> Result<Vec<u16>, Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ports: HashMap<String, u16> = HashMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if let Ok(p) = std::fs::read_to_string(e.path())?.trim().parse() {
                ports.insert(e.file_name().to_string_lossy().into_owned(), p);
            }
        }
        if ports.len() >= n {
            let mut v: Vec<u16> = ports.into_values().collect();
            v.sort_unstable();
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} instances started", ports.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for(what: &str, timeout: Duration, f: impl Fn() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn free_port() -> Result<u16, Error> {
    let l = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    Ok(l.local_addr()?.port())
}
