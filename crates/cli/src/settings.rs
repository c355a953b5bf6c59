//! The "high" phase of argument handling: global flags and environment
//! turned into the objects commands use (data dir, API endpoint, colour).

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::args::GlobalArgs;
use crate::client::{Client, Endpoint};
use crate::exit::{self, Failure};

/// Name of the API socket inside the data dir (the server's `SOCKET_NAME`).
pub const SOCKET_NAME: &str = "berth.sock";

/// Everything the global flags decide.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The data dir.
    pub data_dir: PathBuf,
    /// Where the API is.
    pub endpoint: Endpoint,
    /// Namespace.
    pub namespace: String,
    /// JSON output.
    pub json: bool,
    /// Colours on stdout.
    pub color: bool,
}

impl Settings {
    /// Validate the global flags.
    pub fn from_args(g: &GlobalArgs) -> anyhow::Result<Self> {
        let data_dir = match &g.data_dir {
            Some(d) => absolute(d.clone())?,
            None => default_data_dir()?,
        };
        let endpoint = match &g.addr {
            Some(addr) => Endpoint::Tcp {
                authority: parse_addr(addr)?,
                token: g.token.clone(),
            },
            None => Endpoint::Unix {
                socket: data_dir.join(SOCKET_NAME),
                data_dir: data_dir.clone(),
            },
        };
        // The server would reject it on a write, but a read (`ps`, `logs`)
        // would just find nothing: say what is wrong before either.
        berth_server::desired::check_name("namespace", &g.namespace)
            .map_err(|e| Failure::with_code(exit::BAD_INPUT, e.to_string()))?;
        let color = !g.no_color
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::io::stdout().is_terminal();
        Ok(Settings {
            data_dir,
            endpoint,
            namespace: g.namespace.clone(),
            json: g.json,
            color,
        })
    }

    /// A client for the configured endpoint.
    pub fn client(&self) -> Client {
        Client::new(self.endpoint.clone())
    }
}

/// `$XDG_STATE_HOME/berth`, else `~/.local/state/berth`.
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        let x = PathBuf::from(x);
        if x.is_absolute() {
            return Ok(x.join("berth"));
        }
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/berth")),
        None => Err(Failure::with_code(
            exit::BAD_INPUT,
            "cannot find a data dir: neither XDG_STATE_HOME nor HOME is set (pass --data-dir)",
        )),
    }
}

fn absolute(p: PathBuf) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p)
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

/// `http://host:port` (or bare `host:port`) → `host:port`.
pub fn parse_addr(addr: &str) -> anyhow::Result<String> {
    let bad = |why: &str| {
        Failure::with_code(
            exit::BAD_INPUT,
            format!("BERTH_ADDR/--addr {addr:?} {why} (expected http://HOST:PORT)"),
        )
    };
    if addr.starts_with("https://") {
        return Err(bad("uses https, which this berth does not speak yet"));
    }
    let rest = addr.strip_prefix("http://").unwrap_or(addr);
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(bad("is not an address"));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(authority.to_owned())
        }
        _ => Err(bad("has no port")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("http://127.0.0.1:7777").unwrap(),
            "127.0.0.1:7777"
        );
        assert_eq!(parse_addr("h:1/").unwrap(), "h:1");
        assert!(parse_addr("http://h").is_err());
        assert!(parse_addr("https://h:1").is_err());
        assert!(parse_addr("http://h:1/x").is_err());
    }
}
