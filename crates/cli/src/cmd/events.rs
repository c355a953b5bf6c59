//! `berth events`: the event log (`GET /v1/events`), as a table or NDJSON,
//! and with `-f` followed live over the server's SSE stream.

use clap::Args;
use hyper::Method;
use hyper::body::Incoming;

use super::read_frame;
use crate::client::{check, enc};
use crate::exit;
use crate::output::{paint, print_line};
use crate::settings::Settings;
use berth_model::Event;
use berth_server::api::events::EventsPage;

/// `berth events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only events of this stack (in the current namespace).
    #[arg(short = 'p', long = "project-name", value_name = "NAME")]
    pub stack: Option<String>,
    /// Only events of this service (with -p).
    #[arg(long, value_name = "SERVICE", requires = "stack")]
    pub service: Option<String>,
    /// Only these kinds, comma-separated (instance_exited,rolled_back,…).
    #[arg(long, value_name = "KINDS")]
    pub kind: Option<String>,
    /// How many past events to show first.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub tail: usize,
    /// Only events after this id (a previous `--json` line's `id`).
    #[arg(long, value_name = "ID")]
    pub since: Option<u64>,
}

/// Print past (and with -f, live) events.
pub async fn run(settings: &Settings, args: &EventsArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let mut query = vec![format!("limit={}", args.tail.max(1))];
    if let Some(stack) = &args.stack {
        query.push(format!("namespace={}", enc(&settings.namespace)));
        query.push(format!("stack={}", enc(stack)));
    }
    if let Some(s) = &args.service {
        query.push(format!("service={}", enc(s)));
    }
    if let Some(k) = &args.kind {
        query.push(format!("kind={}", enc(k)));
    }
    if let Some(s) = args.since {
        query.push(format!("since={s}"));
    }
    let color = settings.color && !settings.json;
    if !args.follow {
        let page: EventsPage = client
            .get(&format!("/v1/events?{}", query.join("&")))
            .await?;
        for e in &page.events {
            print_event(e, settings.json, color)?;
        }
        return Ok(exit::OK);
    }
    query.push("follow=true".into());
    let resp = check(
        client
            .send(
                Method::GET,
                &format!("/v1/events?{}", query.join("&")),
                None,
            )
            .await?,
    )
    .await?;
    let mut sse = SseReader::new(resp.into_body());
    while let Some(data) = sse.next().await? {
        let e: Event = serde_json::from_str(&data)
            .map_err(|e| anyhow::anyhow!("bad event from the server: {e}"))?;
        print_event(&e, settings.json, color)?;
    }
    Ok(exit::OK)
}

fn print_event(e: &Event, json: bool, color: bool) -> anyhow::Result<()> {
    if json {
        return print_line(serde_json::to_string(e)?);
    }
    let scope = match (&e.stack, &e.node) {
        (Some(stack), _) => stack.clone(),
        (None, Some(node)) => format!("node {node}"),
        (None, None) => String::new(),
    };
    let kind = format!("{:<18}", e.kind.as_str());
    let kind = if e.kind.is_warning() {
        paint(&kind, "33", color)
    } else {
        paint(&kind, "2", color)
    };
    print_line(format!("{}  {kind} {scope:<12} {}", utc(e.at), e.message))
}

/// `2026-11-23T15:42:01Z` (UTC, so output does not depend on a time zone
/// database).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Reads the `data:` of server-sent events off a streaming body.
struct SseReader {
    body: Incoming,
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseReader {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            buf: Vec::new(),
            data: Vec::new(),
        }
    }

    /// The next event's data (its `data:` lines joined), `None` at the end.
    async fn next(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = self.buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !self.data.is_empty() {
                        let data = self.data.join("\n");
                        self.data.clear();
                        return Ok(Some(data));
                    }
                } else if let Some(d) = line.strip_prefix("data:") {
                    self.data.push(d.strip_prefix(' ').unwrap_or(d).to_owned());
                }
                // `id:`, `event:` and `:` comments (keep-alives) need nothing.
            }
            if !read_frame(&mut self.body, &mut self.buf).await? {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc(1_795_448_521_000), "2026-11-23T15:42:01Z");
    }
}
