//! How to reach an etcd cluster: [`EtcdConfig`], and its URL form
//! (`etcd://h1:2379,h2:2379/namespace?ca=…&cert=…&key=…&user=…`), which is
//! what `berth server --store` takes.

use std::path::PathBuf;
use std::time::Duration;

/// Where the etcd cluster is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs or `host:port` pairs of the members (any subset works; the
    /// client balances over them and fails over between them).
    pub endpoints: Vec<String>,
    /// A key prefix every key is stored under and stripped from on the way
    /// out (in values returned and in watch events), so that several berth
    /// clusters (or test stores) can share one etcd. Prepended verbatim:
    /// `/prod` stores `/berth/x` as `/prod/berth/x`. Two namespaces where one
    /// is a prefix of the other (`/prod`, `/production`) overlap on `range("")`.
    /// Revisions and compaction stay global to the etcd cluster.
    pub namespace: Option<String>,
    /// TLS towards etcd (`https`); `None` is plain `http`.
    pub tls: Option<TlsConfig>,
    /// etcd authentication (user and password), if the cluster has auth on.
    pub credentials: Option<Credentials>,
    /// How long connecting (and the first round trip) may take.
    pub connect_timeout: Duration,
    /// How long any single request may take before it fails.
    pub request_timeout: Duration,
}

/// TLS material, as PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA bundle to verify the members' certificates with (else the system
    /// roots are not consulted: give the CA that signed etcd's certificates).
    pub ca: Option<PathBuf>,
    /// Client certificate, for clusters with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the members' certificates against, when it is not the
    /// host in the endpoint (e.g. endpoints given as IP addresses).
    pub domain: Option<String>,
}

/// etcd user credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Configs get logged; the password must not be.
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why an `etcd://` URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// The URL does not start with `etcd://` or `etcds://`.
    #[error(
        "`{0}` is not an etcd URL: expected etcd://host:port[,host:port…][/namespace][?options]"
    )]
    Scheme(String),
    /// No endpoint between `etcd://` and the path.
    #[error("etcd URL `{0}` names no endpoint: expected etcd://host:port[,host:port…]")]
    NoEndpoint(String),
    /// An endpoint is not `host:port`.
    #[error("etcd endpoint `{endpoint}` must be host:port (e.g. 10.0.0.1:2379)")]
    Endpoint {
        /// The endpoint as written.
        endpoint: String,
    },
    /// An option is not one berth knows.
    #[error(
        "unknown etcd URL option `{0}`: known options are ca, cert, key, domain, user, password, password-file, connect-timeout, timeout"
    )]
    UnknownOption(String),
    /// An option is present twice, or without `=value`.
    #[error("etcd URL option `{0}` must appear once, as {0}=value")]
    BadOption(String),
    /// `cert` without `key` or the other way round.
    #[error("etcd URL options cert and key go together: give both or neither")]
    CertWithoutKey,
    /// `password` without `user`.
    #[error("etcd URL has a password but no user: add user=NAME")]
    PasswordWithoutUser,
    /// `user` without a password.
    #[error("etcd URL has user={0} but no password: add password-file=PATH (or password=…)")]
    UserWithoutPassword(String),
    /// The password file could not be read.
    #[error("cannot read etcd password file {path}: {message}")]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        message: String,
    },
    /// A timeout is not a number of seconds or a duration like `500ms`.
    #[error("etcd URL option {option}={value}: expected seconds (5) or a duration (5s, 500ms)")]
    Timeout {
        /// The option.
        option: String,
        /// Its value.
        value: String,
    },
    /// A `%XX` escape is malformed.
    #[error("etcd URL `{0}` has a malformed %-escape")]
    Escape(String),
}

impl EtcdConfig {
    /// A config for these endpoints, plain http, no namespace, no auth,
    /// 5 s connect timeout and 10 s request timeout.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: None,
            tls: None,
            credentials: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }

    /// Store every key under this prefix.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// Parse `etcd://h1:2379,h2:2379[/namespace][?options]`.
    ///
    /// `etcds://` (or any of the `ca`, `cert`, `key`, `domain` options) turns
    /// TLS on. The path, if any, becomes the namespace with a leading `/`
    /// (`etcd://h:2379/prod` stores keys under `/prod`). Options:
    /// `ca=PEM`, `cert=PEM`, `key=PEM`, `domain=NAME`, `user=NAME`,
    /// `password-file=PATH` (or `password=…`, which ends up in process
    /// listings: prefer the file), `connect-timeout=5s`, `timeout=10s`.
    pub fn from_url(url: &str) -> Result<Self, UrlError> {
        let (tls_scheme, rest) = if let Some(rest) = url.strip_prefix("etcd://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("etcds://") {
            (true, rest)
        } else {
            return Err(UrlError::Scheme(url.to_owned()));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (hosts, path) = match rest.split_once('/') {
            Some((hosts, path)) => (hosts, path),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for endpoint in hosts.split(',').filter(|e| !e.is_empty()) {
            if !valid_host_port(endpoint) {
                return Err(UrlError::Endpoint {
                    endpoint: endpoint.to_owned(),
                });
            }
            endpoints.push(endpoint.to_owned());
        }
        if endpoints.is_empty() {
            return Err(UrlError::NoEndpoint(url.to_owned()));
        }
        let mut config = Self::new(endpoints);
        let path = percent_decode(path.trim_end_matches('/'), url)?;
        if !path.is_empty() {
            config.namespace = Some(format!("/{path}"));
        }

        let mut tls = TlsConfig::default();
        let mut user = None;
        let mut password = None;
        let mut seen = std::collections::BTreeSet::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(UrlError::BadOption(pair.to_owned()));
            };
            if !seen.insert(name.to_owned()) {
                return Err(UrlError::BadOption(name.to_owned()));
            }
            let value = percent_decode(value, url)?;
            match name {
                "ca" => tls.ca = Some(value.into()),
                "cert" => tls.cert = Some(value.into()),
                "key" => tls.key = Some(value.into()),
                "domain" => tls.domain = Some(value),
                "user" => user = Some(value),
                "password" => password = Some(value),
                "password-file" => {
                    let path = PathBuf::from(value);
                    let text =
                        std::fs::read_to_string(&path).map_err(|e| UrlError::PasswordFile {
                            path: path.clone(),
                            message: e.to_string(),
                        })?;
                    password = Some(text.trim_end_matches(['\r', '\n']).to_owned());
                }
                "connect-timeout" => config.connect_timeout = parse_timeout(name, &value)?,
                "timeout" => config.request_timeout = parse_timeout(name, &value)?,
                other => return Err(UrlError::UnknownOption(other.to_owned())),
            }
        }
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(UrlError::CertWithoutKey);
        }
        if tls_scheme || tls != TlsConfig::default() {
            config.tls = Some(tls);
        }
        config.credentials = match (user, password) {
            (None, None) => None,
            (None, Some(_)) => return Err(UrlError::PasswordWithoutUser),
            (Some(user), None) => return Err(UrlError::UserWithoutPassword(user)),
            (Some(user), Some(password)) => Some(Credentials { user, password }),
        };
        Ok(config)
    }
}

fn valid_host_port(endpoint: &str) -> bool {
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return false;
    };
    !host.is_empty() && !host.contains(['/', '@', ' ']) && port.parse::<u16>().is_ok_and(|p| p != 0)
}

fn parse_timeout(option: &str, value: &str) -> Result<Duration, UrlError> {
    let bad = || UrlError::Timeout {
        option: option.to_owned(),
        value: value.to_owned(),
    };
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(at) => value.split_at(at),
        None => (value, "s"),
    };
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(bad)
}

fn percent_decode(text: &str, url: &str) -> Result<String, UrlError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| UrlError::Escape(url.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::Escape(url.to_owned()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn endpoints_namespace_and_options() {
        let c = EtcdConfig::from_url(
            "etcd://10.0.0.1:2379,h2:2379/prod%2Fa?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem&user=berth&password=s3&timeout=500ms&connect-timeout=2",
        )
        .unwrap();
        assert_eq!(c.endpoints, ["10.0.0.1:2379", "h2:2379"]);
        assert_eq!(c.namespace.as_deref(), Some("/prod/a"));
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.cert, Some(PathBuf::from("/c.pem")));
        assert_eq!(tls.key, Some(PathBuf::from("/k.pem")));
        let creds = c.credentials.unwrap();
        assert_eq!(
            (creds.user.as_str(), creds.password.as_str()),
            ("berth", "s3")
        );
        assert!(
            !format!("{creds:?}").contains("s3"),
            "Debug leaks the password"
        );
        assert_eq!(c.request_timeout, Duration::from_millis(500));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
    }

    #[test]
    fn plain_url_has_defaults() {
        let c = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(c, EtcdConfig::new(["127.0.0.1:2379"]));
        let c = EtcdConfig::from_url("etcd://h:1/").unwrap();
        assert_eq!(c.namespace, None);
        let c = EtcdConfig::from_url("etcds://h:1").unwrap();
        assert_eq!(c.tls, Some(TlsConfig::default()));
    }

    #[test]
    fn password_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "hunter2\n").unwrap();
        let c = EtcdConfig::from_url(&format!(
            "etcd://h:2379?user=u&password-file={}",
            file.display()
        ))
        .unwrap();
        assert_eq!(c.credentials.unwrap().password, "hunter2");
        let missing = EtcdConfig::from_url("etcd://h:2379?user=u&password-file=/nonexistent/pw");
        assert!(
            matches!(missing, Err(UrlError::PasswordFile { .. })),
            "{missing:?}"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("http://h:2379", UrlError::Scheme("http://h:2379".into())),
            ("etcd:///ns", UrlError::NoEndpoint("etcd:///ns".into())),
            (
                "etcd://h",
                UrlError::Endpoint {
                    endpoint: "h".into(),
                },
            ),
            (
                "etcd://h:0",
                UrlError::Endpoint {
                    endpoint: "h:0".into(),
                },
            ),
            (
                "etcd://h:99999",
                UrlError::Endpoint {
                    endpoint: "h:99999".into(),
                },
            ),
            ("etcd://h:1?tls=1", UrlError::UnknownOption("tls".into())),
            ("etcd://h:1?ca", UrlError::BadOption("ca".into())),
            ("etcd://h:1?ca=a&ca=b", UrlError::BadOption("ca".into())),
            ("etcd://h:1?cert=a", UrlError::CertWithoutKey),
            ("etcd://h:1?password=x", UrlError::PasswordWithoutUser),
            (
                "etcd://h:1?user=x",
                UrlError::UserWithoutPassword("x".into()),
            ),
            (
                "etcd://h:1?timeout=soon",
                UrlError::Timeout {
                    option: "timeout".into(),
                    value: "soon".into(),
                },
            ),
            (
                "etcd://h:1/a%zz",
                UrlError::Escape("etcd://h:1/a%zz".into()),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(EtcdConfig::from_url(url), Err(want), "{url}");
        }
        let message = EtcdConfig::from_url("etcd://h").unwrap_err().to_string();
        assert!(message.contains("host:port"), "{message}");
    }
}
