//! `berth kv get|put|del|ls|watch`: the KV store, through the server's
//! Consul-shaped `/v1/kv/` routes (so what the CLI writes, consul clients
//! read, and back). Keys are per namespace (`-n`).

use std::io::{Read, Write};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;

use crate::client::{Client, check, enc};
use crate::exit::{self, Failure};
use crate::output;
use crate::settings::Settings;

/// `berth kv`.
#[derive(Debug, Args)]
pub struct KvArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: KvAction,
}

/// The `berth kv` subcommands.
#[derive(Debug, Subcommand)]
pub enum KvAction {
    /// Print a key's value (exit 4 when it does not exist).
    #[command(
        after_help = "Example:\n  berth kv get app/config/db_url\n  berth kv get app/leader --json     # with ModifyIndex, Session, Flags"
    )]
    Get {
        /// The key.
        key: String,
    },
    /// Write a key (the value from the argument, or stdin when absent or `-`).
    #[command(
        after_help = "Example:\n  berth kv put app/config/db_url postgres://db/shop\n  berth kv put app/motd < motd.txt\n  berth kv put app/counter 2 --cas 41     # only if ModifyIndex is still 41 (0: only if absent)"
    )]
    Put {
        /// The key.
        key: String,
        /// The value (`-` or absent: read stdin).
        value: Option<String>,
        /// Write only if the key's ModifyIndex is this (0: only if it does not exist).
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
        /// Opaque flags stored with the key.
        #[arg(long)]
        flags: Option<u64>,
    },
    /// Delete a key, or every key under a prefix with --recurse.
    #[command(
        after_help = "Example:\n  berth kv del app/config/db_url\n  berth kv del app/ --recurse"
    )]
    Del {
        /// The key or prefix.
        key: String,
        /// Delete every key under the prefix.
        #[arg(short, long)]
        recurse: bool,
        /// Delete only if the key's ModifyIndex is this.
        #[arg(long, value_name = "INDEX")]
        cas: Option<u64>,
    },
    /// List keys under a prefix (all keys when none is given).
    #[command(
        after_help = "Example:\n  berth kv ls\n  berth kv ls app/ --separator /     # one level, like a directory\n  berth kv ls app/ --json            # every pair with its value"
    )]
    Ls {
        /// The prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// List one level only: cut names after this separator.
        #[arg(long, value_name = "SEP")]
        separator: Option<String>,
    },
    /// Print a key's value, then every change to it (blocking queries), until interrupted.
    #[command(
        after_help = "Example:\n  berth kv watch app/leader\n  berth kv watch app/ --prefix --json   # one JSON event per line: {event, pair}"
    )]
    Watch {
        /// The key (or prefix with --prefix).
        key: String,
        /// Watch every key under the prefix.
        #[arg(long)]
        prefix: bool,
    },
}

fn kv_path(ns: &str, key: &str, query: &[String]) -> String {
    let key: String = key.split('/').map(enc).collect::<Vec<_>>().join("/");
    let mut q = vec![format!("ns={}", enc(ns))];
    q.extend_from_slice(query);
    format!("/v1/kv/{key}?{}", q.join("&"))
}

async fn body_of(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<bytes::Bytes> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .context("reading the server's answer")?
        .to_bytes())
}

/// A pair as the CLI prints it in JSON: Consul's fields, the value decoded
/// to text when it is UTF-8.
fn readable(mut pair: Value) -> Value {
    if let Some(v) = pair.get("Value").and_then(Value::as_str)
        && let Ok(bytes) = B64.decode(v)
        && let Ok(text) = String::from_utf8(bytes)
    {
        pair["Value"] = Value::String(text);
    }
    pair
}

/// Run a `berth kv` subcommand.
pub async fn run(settings: &Settings, args: &KvArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let ns = &settings.namespace;
    match &args.action {
        KvAction::Get { key } => get(settings, &client, key).await,
        KvAction::Put {
            key,
            value,
            cas,
            flags,
        } => {
            let bytes = match value.as_deref() {
                Some(v) if v != "-" => v.as_bytes().to_vec(),
                _ => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("reading the value from stdin")?;
                    buf
                }
            };
            let mut q = Vec::new();
            if let Some(c) = cas {
                q.push(format!("cas={c}"));
            }
            if let Some(f) = flags {
                q.push(format!("flags={f}"));
            }
            let resp = client
                .send(Method::PUT, &kv_path(ns, key, &q), Some(bytes))
                .await?;
            let written: bool = serde_json::from_slice(&body_of(check(resp).await?).await?)
                .context("unexpected answer from the server")?;
            if settings.json {
                output::print_line(serde_json::json!({ "written": written }))?;
            }
            if !written {
                return Err(Failure::with_code(
                    exit::GENERIC,
                    format!(
                        "{key} not written: its ModifyIndex is not {} (read it again with `berth kv get {key} --json`)",
                        cas.unwrap_or_default()
                    ),
                ));
            }
            Ok(exit::OK)
        }
        KvAction::Del { key, recurse, cas } => {
            let mut q = Vec::new();
            if *recurse {
                q.push("recurse".to_owned());
            }
            if let Some(c) = cas {
                q.push(format!("cas={c}"));
            }
            let resp = client
                .send(Method::DELETE, &kv_path(ns, key, &q), None)
                .await?;
            let deleted: bool = serde_json::from_slice(&body_of(check(resp).await?).await?)
                .context("unexpected answer from the server")?;
            if settings.json {
                output::print_line(serde_json::json!({ "deleted": deleted }))?;
            }
            if !deleted {
                return Err(Failure::with_code(
                    exit::GENERIC,
                    format!("{key} not deleted: its ModifyIndex changed"),
                ));
            }
            Ok(exit::OK)
        }
        KvAction::Ls { prefix, separator } => {
            let mut q = vec![if settings.json { "recurse" } else { "keys" }.to_owned()];
            if let Some(s) = separator.as_ref().filter(|_| !settings.json) {
                q.push(format!("separator={}", enc(s)));
            }
            let resp = client
                .send(Method::GET, &kv_path(ns, prefix, &q), None)
                .await?;
            if resp.status() == hyper::StatusCode::NOT_FOUND {
                if settings.json {
                    output::print_line(format_args!("[]"))?;
                }
                return Ok(exit::OK);
            }
            let v: Value = serde_json::from_slice(&body_of(check(resp).await?).await?)
                .context("unexpected answer from the server")?;
            if settings.json {
                let pairs: Vec<Value> = v
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(readable)
                    .collect();
                output::print_json(&pairs)?;
            } else {
                for k in v.as_array().into_iter().flatten().filter_map(Value::as_str) {
                    output::print_line(format_args!("{k}"))?;
                }
            }
            Ok(exit::OK)
        }
        KvAction::Watch { key, prefix } => watch(settings, &client, key, *prefix).await,
    }
}

async fn get(settings: &Settings, client: &Client, key: &str) -> anyhow::Result<u8> {
    let ns = &settings.namespace;
    let resp = client
        .send(Method::GET, &kv_path(ns, key, &[]), None)
        .await?;
    if resp.status() == hyper::StatusCode::NOT_FOUND {
        return Err(Failure::with_code(
            exit::NOT_FOUND,
            format!("no key {key:?} in namespace {ns} (list keys with `berth kv ls`)"),
        ));
    }
    let v: Value = serde_json::from_slice(&body_of(check(resp).await?).await?)
        .context("unexpected answer from the server")?;
    let pair = v.get(0).cloned().unwrap_or(Value::Null);
    if settings.json {
        output::print_json(&readable(pair))?;
    } else {
        let value = pair
            .get("Value")
            .and_then(Value::as_str)
            .map(|v| B64.decode(v))
            .transpose()
            .context("the server sent a value that is not base64")?
            .unwrap_or_default();
        let mut out = std::io::stdout().lock();
        out.write_all(&value)?;
        if !value.ends_with(b"\n") && !value.is_empty() {
            out.write_all(b"\n")?;
        }
    }
    Ok(exit::OK)
}

/// Print a key's value (or every value under a prefix), then each change,
/// with blocking queries: each request waits on the server until something
/// under the key changes after the index of the previous answer.
async fn watch(
    settings: &Settings,
    client: &Client,
    key: &str,
    prefix: bool,
) -> anyhow::Result<u8> {
    let mut seen: std::collections::BTreeMap<String, i64> = Default::default();
    let mut index: u64 = 0;
    loop {
        let mut q: Vec<String> = if prefix {
            vec!["recurse".into()]
        } else {
            vec![]
        };
        if index > 0 {
            q.push(format!("index={index}"));
            q.push("wait=5m".into());
        }
        let resp = client
            .send(Method::GET, &kv_path(&settings.namespace, key, &q), None)
            .await?;
        let next: u64 = resp
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(index);
        let pairs: Vec<Value> = if resp.status() == hyper::StatusCode::NOT_FOUND {
            Vec::new()
        } else {
            let body = body_of(check(resp).await?).await?;
            serde_json::from_slice(&body).context("unexpected answer from the server")?
        };
        let mut now: std::collections::BTreeMap<String, i64> = Default::default();
        for p in &pairs {
            let k = p
                .get("Key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let m = p.get("ModifyIndex").and_then(Value::as_i64).unwrap_or(0);
            if seen.get(&k) != Some(&m) {
                print_event(settings, "put", p)?;
            }
            now.insert(k, m);
        }
        for gone in seen.keys().filter(|k| !now.contains_key(*k)) {
            print_event(settings, "delete", &serde_json::json!({ "Key": gone }))?;
        }
        seen = now;
        // An index that went backwards (a restored store) restarts the watch.
        index = if next < index { 0 } else { next };
    }
}

fn print_event(settings: &Settings, event: &str, pair: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let pair = readable(pair.clone());
    if settings.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "event": event, "pair": pair })
        )?;
    } else {
        let key = pair.get("Key").and_then(Value::as_str).unwrap_or("");
        match event {
            "put" => {
                let text = pair.get("Value").and_then(Value::as_str).unwrap_or("");
                writeln!(out, "put {key} {text}")?;
            }
            _ => writeln!(out, "{event} {key}")?,
        }
    }
    out.flush()?;
    Ok(())
}
