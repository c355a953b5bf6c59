//! Real etcd processes for tests: a single member ([`Etcd::start`]) or a
//! cluster of N members on 127.0.0.1 ([`EtcdCluster::start`]), each in its
//! own temporary data directory, killed (SIGKILL) and waited for on drop.
//! Children also get SIGKILL if the test process dies first
//! (`PR_SET_PDEATHSIG`), so an aborted run leaves no etcd behind.
//!
//! Missing etcd is a test failure, not a skip: the message says to run
//! `scripts/test`, which installs it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use berth_store::etcd::{EtcdConfig, EtcdStore};
use berth_store::{KeyValue, LeaseId, Result, Revision, Store, Txn, TxnResult, WatchStream};
use bytes::Bytes;
use tokio::time::{Instant, sleep};

/// How long a member may take to become healthy.
const STARTUP: Duration = Duration::from_secs(30);

/// One etcd member process.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    /// TLS for health checks, when the member serves clients over https.
    client_tls: Option<etcd_client::TlsOptions>,
    child: Option<Child>,
}

impl Member {
    /// `host:port` of the client URL.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The last lines etcd logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new("etcd");
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(child) => self.child = Some(child),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "etcd is not installed (no `etcd` on PATH). The etcd store tests need a real \
                 etcd: run scripts/test, which installs Debian's etcd-server (or \
                 `apt-get install etcd-server`)."
            ),
            Err(e) => panic!("cannot start etcd: {e}"),
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: etcd shuts down cleanly (its data written out, its
    /// in-memory state such as auth tokens gone); waits until it exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: plain kill(2) on our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + STARTUP;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "etcd member {} did not stop within {STARTUP:?} of SIGTERM:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start the member again on its data directory (after [`Member::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.name);
        // A restarting member rejoins; it must not try to bootstrap again.
        for arg in &mut self.args {
            if arg == "--initial-cluster-state=new" {
                *arg = "--initial-cluster-state=existing".into();
            }
        }
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn check_alive(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!(
                "etcd member {} exited ({status}) while starting:\n{}",
                self.name,
                self.log_tail()
            );
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of real etcd members on 127.0.0.1 (1 member for most tests).
pub struct EtcdCluster {
    pub members: Vec<Member>,
    // Dropped after the members (fields drop in order): the processes are
    // dead before their data directories go.
    _dir: tempfile::TempDir,
}

/// One etcd member, for the conformance suite.
pub type Etcd = EtcdCluster;

/// `n` distinct free ports. The listeners are held until all are chosen:
/// one dropped at once could be handed out again by the next bind, and a
/// member whose client and peer ports are the same cannot start.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl EtcdCluster {
    /// A single-member etcd, healthy.
    pub async fn single() -> Self {
        Self::start(1).await
    }

    /// `size` members forming one cluster, all healthy, with a leader.
    pub async fn start(size: usize) -> Self {
        Self::start_with(size, None).await
    }

    /// A single member serving clients over TLS with client-certificate
    /// authentication, using the files of [`TlsFiles::generate`].
    pub async fn single_tls(files: &TlsFiles) -> Self {
        Self::start_with(1, Some(files)).await
    }

    async fn start_with(size: usize, tls: Option<&TlsFiles>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let token = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let free = free_ports(2 * size);
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<Member> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client_port, peer_port))| {
                let name = format!("m{i}");
                let data_dir = dir.path().join(&name);
                let scheme = if tls.is_some() { "https" } else { "http" };
                let client = format!("{scheme}://127.0.0.1:{client_port}");
                let peer = format!("http://127.0.0.1:{peer_port}");
                let mut args = vec![
                    format!("--name={name}"),
                    format!("--data-dir={}", data_dir.display()),
                    format!("--listen-client-urls={client}"),
                    format!("--advertise-client-urls={client}"),
                    format!("--listen-peer-urls={peer}"),
                    format!("--initial-advertise-peer-urls={peer}"),
                    format!("--initial-cluster={initial_cluster}"),
                    format!("--initial-cluster-token={token}"),
                    "--initial-cluster-state=new".into(),
                    // Fast elections (and a 1 s minimum lease TTL, which is
                    // 1.5 election timeouts) so tests do not wait on etcd.
                    "--heartbeat-interval=50".into(),
                    "--election-timeout=500".into(),
                    "--logger=zap".into(),
                    "--log-level=warn".into(),
                ];
                if let Some(tls) = tls {
                    args.extend([
                        format!("--cert-file={}", tls.server_cert.display()),
                        format!("--key-file={}", tls.server_key.display()),
                        format!("--trusted-ca-file={}", tls.ca.display()),
                        "--client-cert-auth".into(),
                    ]);
                }
                Member {
                    client_tls: tls.map(TlsFiles::client_options),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port,
                    peer_port,
                    data_dir,
                    args,
                    child: None,
                }
            })
            .collect();
        for member in &mut members {
            member.spawn();
        }
        let mut cluster = Self { members, _dir: dir };
        cluster.wait_healthy().await;
        cluster
    }

    /// Client endpoints of every member (running or not).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Waits until every running member answers and knows a leader.
    pub async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + STARTUP;
        for i in 0..self.members.len() {
            if !self.members[i].is_running() {
                continue;
            }
            loop {
                self.members[i].check_alive();
                if member_status(&self.members[i])
                    .await
                    .is_some_and(|(_, leader)| leader != 0)
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy within {STARTUP:?}:\n{}",
                    self.members[i].name,
                    self.members[i].log_tail()
                );
                sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Index of the current leader among the running members.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + STARTUP;
        loop {
            for (i, member) in self.members.iter().enumerate() {
                if member.is_running()
                    && let Some((id, leader)) = member_status(member).await
                    && id == leader
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {STARTUP:?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// A store on every member's endpoint, under `namespace`.
    pub async fn store(&self, namespace: &str) -> EtcdStore {
        EtcdStore::connect(EtcdConfig::new(self.endpoints()).namespace(namespace))
            .await
            .unwrap()
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

/// `(member id, leader id)` of the member, if it answers.
async fn member_status(member: &Member) -> Option<(u64, u64)> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(500))
        .with_timeout(Duration::from_millis(500));
    if let Some(tls) = &member.client_tls {
        options = options.with_tls(tls.clone());
    }
    let mut client = etcd_client::Client::connect([member.endpoint()], Some(options))
        .await
        .ok()?;
    let status = client.status().await.ok()?;
    Some((status.header()?.member_id(), status.leader()))
}

/// A store that owns the etcd it talks to, so a test's etcd lives exactly
/// as long as its store (the conformance suite only holds the store).
pub struct EtcdBacked {
    pub store: EtcdStore,
    pub etcd: Arc<EtcdCluster>,
}

impl EtcdBacked {
    /// A fresh single-member etcd and a store on it under `namespace`.
    pub async fn fresh(namespace: &str) -> Self {
        let etcd = EtcdCluster::single().await;
        let store = etcd.store(namespace).await;
        Self {
            store,
            etcd: Arc::new(etcd),
        }
    }
}

#[async_trait]
impl Store for EtcdBacked {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.store.get(key).await
    }
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision)> {
        self.store.range(prefix).await
    }
    async fn put(&self, key: &str, value: Bytes, lease: LeaseId) -> Result<Revision> {
        self.store.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<Revision> {
        self.store.delete(key).await
    }
    async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        self.store.txn(txn).await
    }
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream> {
        self.store.watch(prefix, from).await
    }
    async fn revision(&self) -> Result<Revision> {
        self.store.revision().await
    }
    async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        self.store.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<()> {
        self.store.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<()> {
        self.store.lease_revoke(lease).await
    }
    async fn compact(&self, revision: Revision) -> Result<()> {
        self.store.compact(revision).await
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made
/// with the `openssl` command line tool in a temporary directory.
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl is needed to make test certificates (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=berth-test-ca",
                ],
            ]
            .concat(),
        );
        for (name, ext) in [
            (
                "server",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let pem = format!("{name}.pem");
            let extfile = format!("{name}.ext");
            std::fs::write(path(&extfile), ext).unwrap();
            openssl(
                &[
                    &["req", "-new"][..],
                    &ec,
                    &[
                        "-keyout",
                        &key,
                        "-out",
                        &csr,
                        "-subj",
                        &format!("/CN={name}"),
                    ],
                ]
                .concat(),
            );
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ]);
        }
        Self {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
            _dir: dir,
        }
    }

    fn client_options(&self) -> etcd_client::TlsOptions {
        let read = |p: &Path| std::fs::read(p).unwrap();
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ))
    }
}

/// Run `etcdctl ARGS` against `endpoints` (v3 API) and fail the test with
/// its stderr if it fails: the auth tests set up users, roles and grants
/// this way. The 20 s command timeout leaves room for a cluster still
/// electing after a member was killed.
pub fn etcdctl(endpoints: &[String], args: &[&str]) {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--command-timeout=20s")
        .args(args)
        .output()
        .expect("etcdctl (Debian's etcd-client package; run scripts/test)");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
