//! `GET /v1/agent/nodes/{node}/edge/watch` over a real socket: only the
//! node's own credential opens it, the tables come at connect unless the
//! agent's tag is current, and every change is sent whole.

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use berth_agent::logs::LogStore;
use berth_model::edge::EdgeLine;
use berth_model::{Health, InstanceKey, InstanceState, InstanceStatus};
use berth_server::api::{self, ApiContext};
use berth_server::mirror::{Follower, Mirror};
use berth_server::{edge, join};
use berth_store::Store;
use berth_store::embedded::EmbeddedStore;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

async fn get(addr: SocketAddr, path: &str, secret: &str) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "x")
        .header("authorization", format!("Bearer {secret}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// The next NDJSON line of `body` (within 10 s).
async fn next_line(body: &mut Incoming, buf: &mut Vec<u8>) -> EdgeLine {
    loop {
        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            return serde_json::from_slice(&line).unwrap();
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("a line within 10 s")
            .expect("the stream goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
}

fn healthy(slot: u32) -> InstanceStatus {
    InstanceStatus {
        state: InstanceState::Running,
        health: Health::Healthy,
        address: Some("10.213.2.2".into()),
        port: Some(41000),
        ..InstanceStatus::new(
            InstanceKey::new("default", "shop", "web", slot),
            format!("u{slot}"),
            "n2",
            1,
            0,
        )
    }
}

#[tokio::test]
async fn only_the_node_reads_its_edge_tables_and_a_current_tag_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let logs = LogStore::open(dir.path().join("logs"), Default::default()).unwrap();
    let token = join::ensure_join_token(store.as_ref()).await.unwrap();
    let n1 = join::join(store.as_ref(), "n1", &token, 0).await.unwrap();
    let n2 = join::join(store.as_ref(), "n2", &token, 0).await.unwrap();

    let (mut tables, _local, feed) = edge::Tables::new();
    let ctx = ApiContext {
        store: store.clone(),
        logs,
        data_dir: dir.path().to_owned(),
        node_id: "s1".into(),
        token: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = api::router(ctx).layer(axum::Extension(feed));
    tokio::spawn(api::serve_tcp(listener, router, std::future::pending()));

    let path = "/v1/agent/nodes/n1/edge/watch";
    // Another node's secret, and no valid secret at all, are refused.
    assert_eq!(
        get(addr, path, &n2.secret).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(addr, path, "nope").await.status(),
        StatusCode::UNAUTHORIZED
    );

    // No tag: the tables at once.
    let mut mirror = Mirror::default();
    let s = healthy(1);
    mirror.statuses.insert(s.key.clone(), s);
    tables.changed(&mirror, 1).await.unwrap();
    let resp = get(addr, path, &n1.secret).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let EdgeLine::Tables { etag, tables: t } = next_line(&mut body, &mut buf).await else {
        panic!("tables first")
    };
    assert_eq!(t.dns.len(), 1);
    assert_eq!(etag, t.etag());

    // The current tag: nothing at connect; the next change comes whole.
    let resp = get(addr, &format!("{path}?have={etag}"), &n1.secret).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut again = resp.into_body();
    let mut again_buf = Vec::new();
    let s = healthy(2);
    mirror.statuses.insert(s.key.clone(), s);
    tables.changed(&mirror, 2).await.unwrap();
    for (body, buf) in [(&mut body, &mut buf), (&mut again, &mut again_buf)] {
        match next_line(body, buf).await {
            EdgeLine::Tables { etag: e, tables } => {
                assert_ne!(e, etag);
                assert_eq!(tables.dns.len(), 2);
            }
            other => panic!("expected the new tables, got {other:?}"),
        }
    }
}
