//! The dashboard in a real browser (issue 5): headless Chromium, driven over
//! WebDriver by chromedriver, against a real `berth` server and stack.
//!
//! The browser signs in with the token, sees every service healthy, scales
//! a service to 3 from the UI (through the confirmation dialog) and sees the
//! 3 instances appear without a reload, sees in the live logs a line this
//! test caused, and rolls the stack back. It pages the logs back ("Load
//! older" finds a line from before the first page), searches past lines on
//! the server (`grep=`), and sees a non-zero request rate for a service on
//! the network page and a requests/s chart while the test sends traffic
//! through the router. Screenshots of the main pages go
//! to `target/screenshots/` for people to look at.
//!
//! The WebDriver client is the handful of W3C WebDriver calls below, JSON
//! over HTTP/1.1 on a std `TcpStream`: the protocol needs no more, the test
//! stays synchronous like the rest of the harness, and no async client crate
//! (fantoccini, thirtyfour) and its dependency tree is pulled in for one
//! test.
//!
//! Chromium missing is a failure, not a skip: `scripts/deps` installs it
//! (`BERTH_DEPS=test`), so CI always has it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use serde_json::{Value, json};

/// Every wait in the browser is bounded by this.
const UI_TIMEOUT: Duration = Duration::from_secs(45);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session.
struct Browser {
    driver: Driver,
    session: String,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// One HTTP/1.1 request with `Connection: close`; returns the JSON body.
fn http_json(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver may keep the connection open despite `Connection: close`:
    // read the head, then exactly Content-Length bytes (or chunks to the end).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let split = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "WebDriver closed the connection before answering");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut payload = raw[split + 4..].to_vec();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>().unwrap());
    match length {
        Some(len) => {
            while payload.len() < len {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "WebDriver closed the connection mid-body");
                payload.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            s.read_to_end(&mut payload).unwrap();
            if head.contains("transfer-encoding: chunked") {
                payload = dechunk(&payload);
            }
        }
    }
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
    (status, value)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

impl Browser {
    fn start(shots: PathBuf) -> Self {
        let chromium = find_binary(&["chromium", "chromium-browser", "google-chrome"]).expect(
            "Chromium is not installed: the dashboard test needs it. Install it with \
             `BERTH_DEPS=test scripts/deps` (Debian packages chromium and chromium-driver).",
        );
        let chromedriver = find_binary(&["chromedriver"]).expect(
            "chromedriver is not installed: the dashboard test needs it. Install it with \
             `BERTH_DEPS=test scripts/deps` (Debian package chromium-driver).",
        );
        let port = free_port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let driver = Driver { child, port };
        wait_until("chromedriver answers", UI_TIMEOUT, || {
            TcpStream::connect(("127.0.0.1", port))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let (status, v) = http_json(port, "POST", "/session", Some(&caps));
        assert_eq!(status, 200, "chromedriver did not start Chromium: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_owned();
        std::fs::create_dir_all(&shots).unwrap();
        Self {
            driver,
            session,
            shots,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, v) = http_json(self.driver.port, method, &path, body.as_ref());
        assert_eq!(status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The element matching `css`, waiting for it to exist.
    fn find(&self, css: &str) -> String {
        let mut id = String::new();
        wait_until(&format!("element {css}"), UI_TIMEOUT, || {
            let path = format!("/session/{}/element", self.session);
            let (status, v) = http_json(
                self.driver.port,
                "POST",
                &path,
                Some(&json!({"using": "css selector", "value": css})),
            );
            if status == 200 {
                id = v["value"][ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("no element id in {v}"))
                    .to_owned();
                Ok(())
            } else {
                Err(v["value"]["message"].to_string())
            }
        });
        id
    }

    fn click(&self, css: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css);
        self.call("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Waits until `script` (an expression) is truthy; on timeout the
    /// failure says what the page showed.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + UI_TIMEOUT;
        loop {
            let v = self.js(&format!("return !!({script});"));
            if v == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                self.screenshot("failure");
                let text = self.js("return document.body.innerText;");
                panic!(
                    "timed out after {UI_TIMEOUT:?} waiting for {what}; the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, name: &str) {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http_json(
            self.driver.port,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// `target/screenshots`, next to the test's own scratch dir.
fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("screenshots")
}

/// One HTTP/1.0 request through berth's router to `host`; the status line.
fn router_get(http: u16, host: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", http)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    let status = reply.lines().next().unwrap_or_default().to_owned();
    // The router answers an HTTP/1.0 request as HTTP/1.1 (its own version,
    // as RFC 9110 asks); hyper, before its own codec, answered HTTP/1.0.
    let code = status
        .strip_prefix("HTTP/1.1 ")
        .or(status.strip_prefix("HTTP/1.0 "));
    if code.is_some_and(|c| c.starts_with("404") || c.starts_with("200")) {
        Ok(status)
    } else {
        Err(format!("reply {status:?}"))
    }
}

fn stack_file(port: u16, greeting: &str) -> String {
    format!(
        concat!(
            "services:\n",
            "  web:\n",
            // http.server logs every request line to stderr.
            "    command: [\"sh\", \"-c\", \"exec python3 -u -m http.server --bind 127.0.0.1 $$PORT\"]\n",
            "    environment:\n",
            "      GREETING: \"{greeting}\"\n",
            "    ports: [\"{port}:8000\"]\n",
            "    x-berth:\n",
            "      healthcheck: {{ http: /, interval: 500ms, start_interval: 100ms, start_period: 20s, retries: 2 }}\n",
            "  worker:\n",
            "    command: [\"sh\", \"-c\", \"while true; do echo tick; sleep 2; done\"]\n",
        ),
        port = port,
        greeting = greeting,
    )
}

#[test]
fn dashboard_shows_scales_follows_logs_and_rolls_back_in_chromium() {
    let mut berth = Berth::new();
    let [http, dns] = free_ports();
    berth
        .env
        .insert("BERTH_HTTP".into(), format!("127.0.0.1:{http}"));
    berth
        .env
        .insert("BERTH_DNS".into(), format!("127.0.0.1:{dns}"));
    // Samples every second, so request rates show up within the test.
    berth
        .env
        .insert("BERTH_HISTORY_INTERVAL".into(), "1s".into());
    let stack = format!("ui{}", std::process::id());
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("compose.yaml"), stack_file(port, "one")).unwrap();
    berth.ok(dir, &["up", "-d", "-p", &stack]);
    // A second release, so there is something to roll back to.
    std::fs::write(dir.join("compose.yaml"), stack_file(port, "two")).unwrap();
    berth.ok(dir, &["deploy", "-p", &stack, "-m", "second"]);
    wait_until("web and worker run", Duration::from_secs(30), || {
        let ps = berth.ps(dir, &stack);
        all_ready(&ps, "web", 1)?;
        all_ready(&ps, "worker", 1)
    });

    // More log lines than the first page (200) holds after this one, so only
    // paging back finds it: http.server logs each request through the router.
    let host = format!("web.{stack}.localhost");
    let old_marker = format!("ui-old-{}", std::process::id());
    wait_until("the router serves web", UI_TIMEOUT, || {
        router_get(http, &host, &format!("/{old_marker}")).map(drop)
    });
    for i in 0..260 {
        router_get(http, &host, &format!("/filler-{i}")).unwrap();
    }

    let url = berth.ok(dir, &["dashboard", "--no-open"]).trim().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/ui/"),
        "{url}"
    );
    let token = std::fs::read_to_string(berth.data.path().join("token")).unwrap();

    let b = Browser::start(screenshot_dir());

    // Loopback, yet the browser must sign in: the login form shows.
    b.goto(&url);
    b.wait_for("the login form", "!document.querySelector('#login').hidden");
    b.screenshot("login");
    b.type_into("#token", "wrong-token");
    b.click("#login-form button[type=submit]");
    b.wait_for(
        "the wrong token refused",
        "document.querySelector('#login-error').textContent.length > 0",
    );
    b.type_into("#token", token.trim());
    b.click("#login-form button[type=submit]");

    // Overview: every service healthy.
    b.wait_for(
        "both services healthy on the overview",
        &format!(
            "(() => {{ const c = document.querySelector('[data-stack=\"{stack}\"]'); if (!c) return false; \
             const rows = [...c.querySelectorAll('tr[data-service]')]; \
             return rows.length === 2 && rows.every(r => r.innerText.includes('healthy') && !r.innerText.includes('down')); }})()"
        ),
    );
    b.screenshot("overview");

    // Service page: scale web to 3 through the confirmation dialog.
    b.goto(&format!("{url}#/service/default/{stack}/web"));
    b.wait_for(
        "one healthy web instance",
        "document.querySelectorAll('tr[data-instance][data-health=\"healthy\"]').length === 1",
    );
    // Logs page back with the API's cursor: the old line is not in the first
    // page, "Load older" brings it.
    b.wait_for(
        "the first page of logs",
        "document.querySelectorAll('#logs > div').length >= 200",
    );
    let has_old = format!("document.querySelector('#logs').innerText.includes('{old_marker}')");
    assert_eq!(
        b.js(&format!("return {has_old};")),
        Value::Bool(false),
        "the old line is already in the first page"
    );
    for _ in 0..3 {
        if b.js(&format!("return {has_old};")) == Value::Bool(true) {
            break;
        }
        let before = b.js("return document.querySelectorAll('#logs > div').length;");
        b.click("#log-older");
        b.wait_for(
            "older lines loaded",
            &format!(
                "document.querySelectorAll('#logs > div').length > {before} || document.querySelector('#log-status').innerText.includes('No older')"
            ),
        );
    }
    b.wait_for("the old line after Load older", &has_old);
    b.screenshot("service-older");
    // Anything the page keeps across live updates proves there was no reload.
    b.js("window.__noReload = 'still here'; return null;");
    b.type_into("#replicas", "3");
    b.click("#scale");
    b.wait_for(
        "the confirmation dialog",
        "document.querySelector('#confirm').open",
    );
    b.screenshot("scale-confirm");
    b.click("#confirm-ok");
    b.wait_for(
        "3 healthy web instances, live",
        "document.querySelectorAll('tr[data-instance][data-health=\"healthy\"]').length === 3",
    );
    assert_eq!(
        b.js("return window.__noReload || null;"),
        Value::String("still here".into()),
        "the page reloaded"
    );
    let ps = berth.ps(dir, &stack);
    all_ready(&ps, "web", 3).unwrap();

    // Live logs: a request this test makes shows up.
    let marker = format!("ui-marker-{}", std::process::id());
    // A 404 is fine: http.server logs every request it answers.
    wait_until("the published port answers", UI_TIMEOUT, || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        write!(s, "GET /{marker} HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        let _ = s.read_to_string(&mut reply);
        if reply.starts_with("HTTP/") {
            Ok(())
        } else {
            Err(format!("reply {reply:?}"))
        }
    });
    b.wait_for(
        "the request's log line in the live logs",
        &format!("document.querySelector('#logs').innerText.includes('{marker}')"),
    );
    b.type_into("#log-search", &marker);
    b.wait_for(
        "the search to keep only matching lines",
        &format!(
            "[...document.querySelectorAll('#logs > div')].every(d => d.innerText.includes('{marker}')) && document.querySelector('#logs mark')"
        ),
    );
    b.screenshot("service");

    // Stack page: diff the two releases, then roll back.
    b.goto(&format!("{url}#/stack/default/{stack}"));
    b.wait_for(
        "the release history",
        "document.querySelectorAll('tr[data-release]').length >= 2",
    );
    b.click("#diff-from option[value='1']");
    b.click("#diff-to + button");
    b.wait_for(
        "the diff naming the changed variable",
        "document.querySelector('#diff .add') && document.querySelector('#diff').innerText.includes('two')",
    );
    b.screenshot("stack");
    b.click("#rollback");
    b.wait_for(
        "the confirmation dialog",
        "document.querySelector('#confirm').open",
    );
    b.click("#confirm-ok");
    b.wait_for(
        "the rollback's result",
        "[...document.querySelectorAll('.toast')].some(t => t.innerText.includes('Rolled back'))",
    );
    let releases: Value =
        serde_json::from_str(&berth.ok(dir, &["releases", "-p", &stack, "--json"])).unwrap();
    let text = releases.to_string();
    assert!(text.contains("rollback"), "no rollback release: {text}");
    b.wait_for(
        "the new release in the history",
        "document.querySelector('tr[data-release] .pill') && document.querySelectorAll('tr[data-release]').length >= 3",
    );
    b.screenshot("stack-rolled-back");

    // The network page: a live request rate while traffic flows through the
    // router.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, host) = (stop.clone(), host.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = router_get(http, &host, "/traffic");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    b.goto(&format!("{url}#/network"));
    b.wait_for(
        "the network view",
        &format!("document.querySelector('#network') && document.querySelector('#network').innerText.includes('web.{stack}.default.berth')"),
    );
    b.wait_for(
        "a non-zero request rate for web",
        &format!(
            "(() => {{ const td = document.querySelector('td[data-rate=\"default/{stack}/web\"] .rate'); return td && parseFloat(td.innerText) > 0; }})()"
        ),
    );
    b.screenshot("network");

    // Search reaches past lines on the server (`grep=`): a fresh service page
    // holds only the last 200 lines, the old one is not among them.
    b.goto(&format!("{url}#/service/default/{stack}/web"));
    b.wait_for(
        "the first page of logs",
        "document.querySelectorAll('#logs > div').length >= 200",
    );
    b.type_into("#log-search", &old_marker);
    b.wait_for(
        "the old line found by the server's search",
        &format!(
            "{has_old} && document.querySelector('#log-status').innerText.includes('past matching')"
        ),
    );
    b.wait_for(
        "the requests/s chart",
        "document.querySelector('#charts').innerText.includes('Requests/s')",
    );
    b.screenshot("service-search");
    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();

    // The other pages render for this stack.
    b.goto(&format!("{url}#/kv"));
    b.type_into("#kv-key", "ui/greeting");
    b.type_into("#kv-value", "hello");
    b.click("#kv-value ~ .controls button[type=submit]");
    b.wait_for(
        "the key in the KV browser",
        "document.querySelector('#kv') && document.querySelector('#kv').innerText.includes('ui/greeting')",
    );
    b.screenshot("kv");
    b.goto(&format!("{url}#/nodes"));
    b.wait_for(
        "the node with its instances",
        &format!("document.querySelector('[data-node]') && document.querySelector('[data-node]').innerText.includes('{stack}/worker.')"
        ),
    );
    b.screenshot("nodes");

    // A phone-sized viewport.
    b.resize(390, 844);
    b.goto(&format!("{url}#/"));
    b.wait_for(
        "the overview on a phone",
        &format!("document.querySelector('[data-stack=\"{stack}\"]')"),
    );
    b.screenshot("overview-phone");
}
