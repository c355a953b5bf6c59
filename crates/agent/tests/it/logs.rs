//! The log store: rotation, caps, long lines, merged reads.

use std::time::Duration;

use berth_agent::{LogConfig, LogQuery, LogStore};
use berth_model::LogStream;

use crate::common::key;

fn dir_size(dir: &std::path::Path) -> (u64, usize) {
    let mut total = 0;
    let mut files = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        total += e.metadata().unwrap().len();
        files += 1;
    }
    (total, files)
}

#[tokio::test]
async fn files_rotate_at_the_cap_and_never_exceed_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        max_file_bytes: 4096,
        max_files: 3,
        max_line_bytes: 1024,
        queue: 64,
    };
    let logs = LogStore::open(dir.path().to_path_buf(), cfg).unwrap();
    let k = key("chatty", 1);
    let inst = dir.path().join("default/demo/chatty.1");
    for i in 0..2000 {
        logs.append(
            &k,
            LogStream::Stdout,
            &format!("line number {i:05} with some padding"),
        )
        .await
        .unwrap();
        if i % 100 == 0 {
            logs.flush().await.unwrap();
            let (total, files) = dir_size(&inst);
            assert!(total <= 3 * 4096, "{total} bytes after {i} lines");
            assert!(files <= 3);
        }
    }
    logs.flush().await.unwrap();
    let (total, files) = dir_size(&inst);
    assert_eq!(files, 3);
    assert!(total <= 3 * 4096);
    // The newest lines are kept, in order and without gaps.
    let lines = logs
        .read(&LogQuery {
            namespace: "default".into(),
            stack: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        lines.last().unwrap().line,
        "line number 01999 with some padding"
    );
    let numbers: Vec<u32> = lines
        .iter()
        .map(|l| l.line[12..17].parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
    // Two full files at least (about 73 lines of 56 bytes each), plus the current one.
    assert!(numbers.len() >= 140, "{} lines kept", numbers.len());
}

#[tokio::test]
async fn long_lines_are_split_and_partial_last_lines_kept() {
    let dir = tempfile::tempdir().unwrap();
    let logs = LogStore::open(dir.path().to_path_buf(), LogConfig::default()).unwrap();
    let k = key("big", 1);
    let mut input = vec![b'a'; 150 * 1024];
    input.extend_from_slice(b"\nshort\ntail-without-newline");
    logs.capture(&k, LogStream::Stderr, &input[..]).await;
    let lines = logs
        .read(&LogQuery {
            namespace: "default".into(),
            stack: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let lens: Vec<usize> = lines.iter().map(|l| l.line.len()).collect();
    assert_eq!(lens, [65536, 65536, 22528, 5, 20]);
    assert!(lines.iter().all(|l| l.stream == LogStream::Stderr));
    assert!(lines.windows(2).all(|w| w[0].ts_us < w[1].ts_us));
}

#[tokio::test]
async fn reads_merge_instances_in_time_order_with_tail_and_since() {
    let dir = tempfile::tempdir().unwrap();
    let logs = LogStore::open(dir.path().to_path_buf(), LogConfig::default()).unwrap();
    let (a, b, w) = (key("web", 1), key("web", 2), key("worker", 1));
    for i in 0..5 {
        logs.append(&a, LogStream::Stdout, &format!("a{i}"))
            .await
            .unwrap();
        logs.append(&b, LogStream::Stdout, &format!("b{i}"))
            .await
            .unwrap();
        logs.append(&w, LogStream::Stdout, &format!("w{i}"))
            .await
            .unwrap();
    }
    let q = LogQuery {
        namespace: "default".into(),
        stack: "demo".into(),
        services: vec!["web".into()],
        ..Default::default()
    };
    let all = logs.read(&q).await.unwrap();
    let texts: Vec<&str> = all.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(
        texts,
        ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]
    );

    let tail = logs
        .read(&LogQuery {
            tail: Some(3),
            ..q.clone()
        })
        .await
        .unwrap();
    let texts: Vec<&str> = tail.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(texts, ["b3", "a4", "b4"]);

    let since = all[6].ts_us;
    let later = logs
        .read(&LogQuery {
            since_us: Some(since),
            ..q.clone()
        })
        .await
        .unwrap();
    let texts: Vec<&str> = later.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(texts, ["a3", "b3", "a4", "b4"]);

    // Survives a new store on the same directory (an agent restart).
    drop(logs);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reopened = LogStore::open(dir.path().to_path_buf(), LogConfig::default()).unwrap();
    assert_eq!(reopened.read(&q).await.unwrap().len(), 10);

    reopened.remove_stack("default", "demo").await.unwrap();
    assert!(reopened.read(&q).await.unwrap().is_empty());
    assert!(!dir.path().join("default/demo").exists());
}
