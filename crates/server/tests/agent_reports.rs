//! A joined agent's reports through the real HTTP API
//! (`/v1/agent/nodes/{node}/statuses`), as a server that was stopped and
//! resumed applies them: late, after newer ones went to another server.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::SocketAddr;
use std::sync::Arc;

use berth_agent::logs::{LogQuery, LogStore};
use berth_model::api::{LogBatch, LogBatchResponse};
use berth_model::{
    Assignment, DesiredState, Health, InstanceKey, InstanceState, InstanceStatus, LogLine,
    LogStream, Node, keys,
};
use berth_server::api::{self, ApiContext};
use berth_server::join;
use berth_store::embedded::EmbeddedStore;
use berth_store::{Store, get_json, put_json};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

/// A store, a joined and registered node `n1` with `slots` instances of
/// `web` assigned, and `servers` API servers on that store.
struct Cluster {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    logs: Vec<LogStore>,
    servers: Vec<SocketAddr>,
    secret: String,
}

fn key(slot: u32) -> InstanceKey {
    InstanceKey::new("default", "shop", "web", slot)
}

impl Cluster {
    async fn start(servers: usize, slots: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
        let token = join::ensure_join_token(store.as_ref()).await.unwrap();
        let cred = join::join(store.as_ref(), "n1", &token, 0).await.unwrap();
        let node = Node {
            id: "n1".into(),
            address: "10.1.0.1".into(),
            labels: Default::default(),
            facts: Default::default(),
            draining: false,
            updated_at: 0,
        };
        join::register(store.as_ref(), None, node, 1).await.unwrap();
        let opts = berth_spec::LoadOptions {
            working_dir: dir.path().to_owned(),
            project_name: Some("shop".into()),
            ..Default::default()
        };
        let compose = "services:\n  web:\n    command: [sleep, '1000']\n";
        let service = berth_spec::load_str(std::path::Path::new("compose.yaml"), compose, &opts)
            .unwrap()
            .stack
            .services["web"]
            .clone();
        for slot in 1..=slots {
            let a = Assignment {
                key: key(slot),
                uid: format!("u{slot}"),
                node: "n1".into(),
                release: 1,
                restart_generation: 0,
                service: service.clone(),
                env: Default::default(),
                desired: DesiredState::Running,
                created_at: 1,
                retire_at: None,
            };
            put_json(store.as_ref(), &keys::assignment("n1", &key(slot)), &a)
                .await
                .unwrap();
        }
        let mut addrs = Vec::new();
        let mut logs = Vec::new();
        for i in 0..servers {
            // Each server its own log store, as each `berth server` has.
            let l =
                LogStore::open(dir.path().join(format!("logs{i}")), Default::default()).unwrap();
            let ctx = ApiContext {
                store: store.clone(),
                logs: l.clone(),
                data_dir: dir.path().to_owned(),
                node_id: format!("s{i}"),
                token: None,
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            tokio::spawn(api::serve_tcp(
                listener,
                api::router(ctx),
                std::future::pending(),
            ));
            logs.push(l);
        }
        Cluster {
            _dir: dir,
            store,
            logs,
            servers: addrs,
            secret: cred.secret,
        }
    }

    async fn post(&self, server: usize, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        let stream = tokio::net::TcpStream::connect(self.servers[server])
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/agent/nodes/n1{path}"))
            .header("host", "x")
            .header("authorization", format!("Bearer {}", self.secret))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn report(&self, server: usize, batch: &[InstanceStatus]) {
        let (status, body) = self
            .post(server, "/statuses", serde_json::to_vec(batch).unwrap())
            .await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }

    async fn ship(&self, server: usize, batch: &LogBatch) -> LogBatchResponse {
        let (status, body) = self
            .post(server, "/logs", serde_json::to_vec(batch).unwrap())
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Every line stored by any server, in time order.
    async fn lines(&self) -> Vec<String> {
        let q = LogQuery {
            namespace: "default".into(),
            stack: "shop".into(),
            ..Default::default()
        };
        let mut all = Vec::new();
        for l in &self.logs {
            all.extend(l.read(&q).await.unwrap());
        }
        all.sort_by_key(|l| l.ts_us);
        all.into_iter().map(|l| l.line).collect()
    }

    async fn stored(&self, slot: u32) -> (InstanceStatus, berth_store::Revision) {
        let (s, kv) = get_json::<InstanceStatus>(self.store.as_ref(), &keys::status(&key(slot)))
            .await
            .unwrap()
            .expect("a stored status");
        (s, kv.mod_revision)
    }
}

fn status(slot: u32, seq: u64, health: Health) -> InstanceStatus {
    InstanceStatus {
        state: InstanceState::Running,
        health,
        pid: Some(4000 + slot),
        seq,
        ..InstanceStatus::new(key(slot), format!("u{slot}"), "n1", 1, seq / 1000)
    }
}

#[tokio::test]
async fn an_older_status_applied_late_does_not_replace_a_newer_one() {
    let c = Cluster::start(2, 1).await;
    // The agent's newer report reached s1 (the retry after s0 hung)…
    c.report(1, &[status(1, 2_000, Health::Unhealthy)]).await;
    // …then s0 resumes and applies the older batch it had received.
    c.report(0, &[status(1, 1_000, Health::Healthy)]).await;
    let (s, rev) = c.stored(1).await;
    assert_eq!((s.seq, s.health), (2_000, Health::Unhealthy));
    // The same report twice (a retried batch) is not written again.
    c.report(0, &[status(1, 2_000, Health::Unhealthy)]).await;
    assert_eq!(c.stored(1).await.1, rev, "a duplicate was written");
    // A newer one is.
    c.report(0, &[status(1, 3_000, Health::Healthy)]).await;
    let (s, _) = c.stored(1).await;
    assert_eq!((s.seq, s.health), (3_000, Health::Healthy));
    // An agent from before `seq` (none sent) is written as before.
    c.report(1, &[status(1, 0, Health::Starting)]).await;
    let (s, _) = c.stored(1).await;
    assert_eq!((s.seq, s.health), (0, Health::Starting));
}

#[tokio::test]
async fn a_late_batch_larger_than_one_transaction_keeps_every_newer_status() {
    // 150 statuses: two transactions (etcd's limit); in the late batch the
    // even slots are older than what is stored, the odd ones newer.
    let c = Cluster::start(2, 150).await;
    let first: Vec<_> = (1..=150)
        .map(|slot| status(slot, 10_000 + u64::from(slot), Health::Healthy))
        .collect();
    c.report(1, &first).await;
    let late: Vec<_> = (1..=150)
        .map(|slot| {
            let seq = if slot % 2 == 0 { 5_000 } else { 20_000 };
            status(slot, seq + u64::from(slot), Health::Unhealthy)
        })
        .collect();
    c.report(0, &late).await;
    for slot in 1..=150 {
        let (s, _) = c.stored(slot).await;
        if slot % 2 == 0 {
            assert_eq!(
                (s.seq, s.health),
                (10_000 + u64::from(slot), Health::Healthy)
            );
        } else {
            assert_eq!(
                (s.seq, s.health),
                (20_000 + u64::from(slot), Health::Unhealthy)
            );
        }
    }
}

#[tokio::test]
async fn concurrent_copies_on_two_servers_leave_the_newest() {
    // Round after round, an older and a newer report of one instance reach
    // the two servers at once (the copy a resumed server applies racing
    // the agent's next report elsewhere): the compare-and-swap races are
    // real, and the newer one must be what stays every time.
    let c = Arc::new(Cluster::start(2, 1).await);
    for round in 1..=20u64 {
        let (older, newer) = (round * 2_000 - 1_000, round * 2_000);
        let reports: Vec<_> = [(round % 2, older), (1 - round % 2, newer)]
            .into_iter()
            .map(|(server, seq)| {
                let c = c.clone();
                let server = usize::try_from(server).unwrap();
                tokio::spawn(async move {
                    c.report(server, &[status(1, seq, Health::Healthy)]).await;
                })
            })
            .collect();
        for r in reports {
            r.await.unwrap();
        }
        assert_eq!(c.stored(1).await.0.seq, newer, "round {round}");
    }
}

#[tokio::test]
async fn a_forget_applied_late_keeps_the_status_reported_after_it() {
    let c = Cluster::start(2, 1).await;
    let forget = |seq: u64| {
        serde_json::to_vec(&berth_model::api::ForgetRequest { key: key(1), seq }).unwrap()
    };
    // The slot's next instance on this node reported (s1) after the agent
    // forgot the previous one (a copy of that forget sits in hung s0).
    c.report(1, &[status(1, 2_000, Health::Healthy)]).await;
    let (code, _) = c.post(0, "/forget", forget(1_000)).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    assert_eq!(
        c.stored(1).await.0.seq,
        2_000,
        "a late forget removed a newer status"
    );
    // A forget stamped after it removes it.
    let (code, _) = c.post(0, "/forget", forget(3_000)).await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    let gone = get_json::<InstanceStatus>(c.store.as_ref(), &keys::status(&key(1)))
        .await
        .unwrap();
    assert!(gone.is_none());
    // An older agent's forget (the bare instance key, no stamp) removes as before.
    c.report(1, &[status(1, 4_000, Health::Healthy)]).await;
    let (code, _) = c
        .post(1, "/forget", serde_json::to_vec(&key(1)).unwrap())
        .await;
    assert_eq!(code, StatusCode::NO_CONTENT);
    let gone = get_json::<InstanceStatus>(c.store.as_ref(), &keys::status(&key(1)))
        .await
        .unwrap();
    assert!(gone.is_none());
}

/// Lines `from..to` of a shipper's stream, as the agent numbers them.
fn batch(stream: u64, from: u64, to: u64) -> LogBatch {
    LogBatch {
        lines: (from..to)
            .map(|n| LogLine {
                key: key(1),
                ts_us: 1_000 + n,
                stream: LogStream::Stdout,
                line: format!("line {n}"),
            })
            .collect(),
        dropped: 0,
        stream,
        offset: from,
    }
}

fn numbered(range: std::ops::Range<u64>) -> Vec<String> {
    range.map(|n| format!("line {n}")).collect()
}

#[tokio::test]
async fn a_log_batch_sent_again_is_stored_once_whichever_server_gets_it() {
    let c = Cluster::start(2, 1).await;
    let r = c.ship(0, &batch(7, 0, 3)).await;
    assert_eq!((r.accepted, r.duplicates), (3, 0));
    // The agent gave up on s0 (hung) and sent the batch to s1: s0 had
    // stored it, so s1 stores nothing…
    let r = c.ship(1, &batch(7, 0, 3)).await;
    assert_eq!((r.accepted, r.duplicates), (0, 3));
    // …and a copy sent again with lines that arrived meanwhile stores
    // only those.
    let r = c.ship(1, &batch(7, 0, 5)).await;
    assert_eq!((r.accepted, r.duplicates), (2, 3));
    let r = c.ship(0, &batch(7, 5, 6)).await;
    assert_eq!((r.accepted, r.duplicates), (1, 0));
    assert_eq!(c.lines().await, numbered(0..6));
    // A restarted agent's new stream starts from 0 again: stored.
    let r = c.ship(1, &batch(8, 0, 1)).await;
    assert_eq!((r.accepted, r.duplicates), (1, 0));
    // An agent from before streams (none given): stored as it comes.
    c.ship(0, &batch(0, 0, 1)).await;
    c.ship(0, &batch(0, 0, 1)).await;
    let mut want = numbered(0..6);
    want.extend(vec!["line 0".to_owned(); 3]);
    let mut got = c.lines().await;
    got.sort();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn concurrent_copies_of_log_batches_on_two_servers_store_each_line_once() {
    // The agent sends its batches in order, one at a time; here each goes
    // to both servers at once (the copy a resumed server applies racing
    // the retry), so the compare-and-swap races are real.
    let c = Arc::new(Cluster::start(2, 1).await);
    for b in 0..20u64 {
        let copies: Vec<_> = (0..2)
            .map(|server| {
                let c = c.clone();
                tokio::spawn(async move { c.ship(server, &batch(9, b * 10, b * 10 + 10)).await })
            })
            .collect();
        let mut accepted = 0;
        let mut duplicates = 0;
        for t in copies {
            let r = t.await.unwrap();
            accepted += r.accepted;
            duplicates += r.duplicates;
        }
        assert_eq!((accepted, duplicates), (10, 10), "batch {b}");
    }
    let mut got = c.lines().await;
    got.sort();
    let mut want = numbered(0..200);
    want.sort();
    assert_eq!(got, want);
}

// ---------- a real agent across a restart whose clock went back ----------

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The clock of a machine whose time is an hour ahead (it is set back
/// before the agent's next run).
fn an_hour_ahead() -> u64 {
    wall_us() + 3_600_000_000
}

/// Run the real agent (process driver, reports over the API to server 0)
/// on `data_dir` with `clock` until the store holds a running status of a
/// process other than `not_pid`; then stop it. Returns that status.
async fn run_agent_until_running(
    c: &Cluster,
    data_dir: &std::path::Path,
    clock: fn() -> u64,
    not_pid: Option<u32>,
) -> InstanceStatus {
    use futures::StreamExt;
    let client = berth_agent::remote::ApiClient::new(
        c.servers[0].to_string(),
        "n1".into(),
        Some(c.secret.clone()),
    );
    let cfg = berth_agent::AgentConfig {
        node_id: "n1".into(),
        data_dir: data_dir.to_owned(),
        address: "127.0.0.1".into(),
        logs: Default::default(),
    };
    let logs = LogStore::open(data_dir.join("logs"), Default::default()).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let options = berth_agent::AgentOptions {
        wall_clock_us: Some(clock),
        ..Default::default()
    };
    // Watch before the agent starts, so no write is missed.
    let status_key = keys::status(&key(1));
    let from = c.store.revision().await.unwrap() + 1;
    let mut watch = c.store.watch(&status_key, from).await.unwrap();
    let agent = tokio::spawn(berth_agent::run_with(
        cfg,
        Arc::new(berth_agent::remote::ApiControlPlane::new(client)),
        logs,
        rx,
        options,
    ));
    let mut last: Option<InstanceStatus> = None;
    let wanted = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            if let Some((s, _)) = get_json::<InstanceStatus>(c.store.as_ref(), &status_key)
                .await
                .unwrap()
            {
                if s.state == InstanceState::Running && s.pid.is_some() && s.pid != not_pid {
                    return s;
                }
                last = Some(s);
            }
            watch.next().await.expect("the watch goes on").unwrap();
        }
    })
    .await;
    let Ok(status) = wanted else {
        panic!(
            "no running status of a new process stored within 30 s (the server kept refusing this run's reports as older?); last stored: {last:?}"
        );
    };
    stop.send_replace(true);
    tokio::time::timeout(std::time::Duration::from_secs(30), agent)
        .await
        .expect("the agent stops within 30 s")
        .unwrap()
        .unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_whose_clock_was_set_back_still_gets_its_statuses_written() {
    let c = Cluster::start(1, 1).await;
    // Keeps n1's lease (which its statuses live on) alive whatever the
    // machine's load.
    let beat = {
        let client = berth_agent::remote::ApiClient::new(
            c.servers[0].to_string(),
            "n1".into(),
            Some(c.secret.clone()),
        );
        tokio::spawn(async move {
            loop {
                let _ = client.heartbeat().await;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    // The first run stamps its reports from a clock an hour ahead, and
    // reports `stopped` with such a stamp when it stops.
    let first = run_agent_until_running(&c, dir.path(), an_hour_ahead, None).await;
    assert!(first.seq > wall_us() + 3_000_000_000, "{}", first.seq);
    // The clock is set back by an hour; the agent starts again on the same
    // data dir. Its new process's statuses must be written, not refused as
    // older than the first run's.
    let second = run_agent_until_running(&c, dir.path(), wall_us, first.pid).await;
    assert!(second.seq > first.seq, "{} after {}", second.seq, first.seq);
    beat.abort();
}
