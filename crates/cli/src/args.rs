//! Command-line syntax (the "low" phase): what the user typed, parsed and
//! checked for shape by clap, with no I/O. [`crate::settings`] turns it into
//! the objects the commands use.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// berth: run a Compose file or Procfile as supervised services.
#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Run a Compose file or Procfile as supervised, discoverable services",
    after_help = concat!(
        "Example:\n  berth up -d          # start the stack in this folder in the background\n  berth ps             # see its instances\n  berth logs -f web    # follow the web service's logs\n  berth down           # stop and forget it\n\n",
        "Exit codes:\n  0  success\n  1  generic failure\n  2  bad input (stack file errors, bad flags or arguments)\n  3  no server running / cannot connect to the server\n  4  not found (stack or service)\n  5  `up -d` or a rollout (deploy, rollback, env set|unset) failed: an instance is unhealthy or failed, or the wait timed out\n  130  interrupted (second Ctrl-C)\n\n",
        "Environment:\n  BERTH_DATA_DIR  data dir (default $XDG_STATE_HOME/berth, else ~/.local/state/berth)\n  BERTH_ADDR      http://HOST:PORT of a remote server (instead of the data dir's socket)\n  BERTH_TOKEN     API token for BERTH_ADDR when it is not a loopback address\n  NO_COLOR        disable colours"
    )
)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Where the server keeps its state, logs, socket and token.
    #[arg(long, global = true, env = "BERTH_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of a remote server (http://HOST:PORT) instead of the local socket.
    #[arg(long, global = true, env = "BERTH_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// API token for --addr (needed when the server listens on a non-loopback address).
    #[arg(
        long,
        global = true,
        env = "BERTH_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Namespace of the stack.
    #[arg(
        short = 'n',
        long,
        global = true,
        default_value = "default",
        value_name = "NS"
    )]
    pub namespace: String,
    /// Machine-readable JSON output (where supported).
    #[arg(long, global = true)]
    pub json: bool,
    /// Never use colours (also: NO_COLOR set, or stdout not a terminal).
    #[arg(long, global = true)]
    pub no_color: bool,
}

/// Which stack a stack-scoped command is about.
#[derive(Debug, Clone, Default, Args)]
pub struct StackArgs {
    /// Stack file (repeatable; later files override earlier ones).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Stack name (default: the stack file's, else the only stack running).
    #[arg(short = 'p', long = "project-name", value_name = "NAME")]
    pub project: Option<String>,
    /// Enable services of this profile (repeatable).
    #[arg(long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<String>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start (or update) a stack and stream its logs; with -d, wait until healthy.
    #[command(
        after_help = "Example:\n  berth up             # run ./compose.yaml, logs until Ctrl-C (which stops it)\n  berth up -d          # return once every service is running and healthy\n  berth up -f prod.yml -p shop --profile debug"
    )]
    Up(UpArgs),
    /// List instances with state, health, pid, address and restarts.
    #[command(
        after_help = "Example:\n  berth ps\n  berth ps -a --json | jq '.[] | select(.health != \"healthy\")'"
    )]
    Ps(PsArgs),
    /// Show the discovery catalog: each service's instances (healthy or not),
    /// routes, DNS names and published ports.
    #[command(
        after_help = "Example:\n  berth services\n  berth services web --json | jq '.[0].instances[] | select(.healthy)'"
    )]
    Services(CatalogArgs),
    /// Show past and live logs of a stack's services, merged in time order.
    #[command(
        after_help = "Example:\n  berth logs -f                # all services, follow\n  berth logs --tail 50 web     # last 50 lines of web\n  berth logs --since 10m worker\n  berth logs --grep 'ERROR|WARN' --json | jq .line"
    )]
    Logs(LogsArgs),
    /// Stop services (all when none are named); they stay defined.
    #[command(
        after_help = "Example:\n  berth stop           # stop every service of the stack\n  berth stop worker"
    )]
    Stop(ServicesArgs),
    /// Start stopped services (all when none are named).
    #[command(after_help = "Example:\n  berth start worker")]
    Start(ServicesArgs),
    /// Replace the instances of services (all when none are named).
    #[command(after_help = "Example:\n  berth restart web")]
    Restart(ServicesArgs),
    /// Stop a stack and forget it (named volumes are kept unless -v).
    #[command(after_help = "Example:\n  berth down\n  berth down -p shop -v")]
    Down(DownArgs),
    /// Set the number of replicas of services.
    #[command(after_help = "Example:\n  berth scale web=5\n  berth scale web=2 worker=0")]
    Scale(ScaleArgs),
    /// Deploy the stack file as a new release, rolled out without downtime.
    #[command(
        after_help = "Example:\n  berth deploy --dry-run       # what would change, like `terraform plan`\n  berth deploy -m \"fix login\"  # new release; waits for the rolling update\n\nExits 5 when the rollout fails (it is rolled back automatically unless\nupdate_config.failure_action says otherwise), printing why."
    )]
    Deploy(DeployArgs),
    /// List the stack's releases (only those that changed SERVICE, if given).
    #[command(after_help = "Example:\n  berth releases\n  berth releases web --json")]
    Releases(ReleasesArgs),
    /// Roll back to an older release (default: the previous one) as a new release.
    #[command(
        after_help = "Example:\n  berth rollback          # to the release before the current one\n  berth rollback v3"
    )]
    Rollback(RollbackArgs),
    /// List, set or unset config vars (each change is a new release, rolled out).
    #[command(
        after_help = "Example:\n  berth env                          # list every service's environment\n  berth env set LOG_LEVEL=debug      # all services\n  berth env set -s web WORKERS=4\n  berth env unset LOG_LEVEL"
    )]
    Env(EnvArgs),
    /// Print the resolved stack (YAML, or JSON with --json), or its errors.
    #[command(
        after_help = "Example:\n  berth config                 # ./compose.yaml after interpolation, extends, profiles\n  berth config -f a.yml -f b.yml --json\n  berth config --services"
    )]
    Config(ConfigArgs),
    /// Run the berth server in the foreground (for systemd or containers).
    #[command(
        after_help = "Example:\n  berth server                          # socket in the data dir + a free 127.0.0.1 port\n  berth server --listen 0.0.0.0:7777    # reachable from other machines (token required)"
    )]
    Server(ServerArgs),
    /// Read, write, list and watch keys of the KV store (per namespace).
    #[command(
        after_help = "Example:\n  berth kv put app/config/db_url postgres://db/shop\n  berth kv get app/config/db_url\n  berth kv ls app/\n  berth kv watch app/ --prefix\n  berth kv del app/ --recurse"
    )]
    Kv(crate::cmd::kv::KvArgs),
    /// Run an agent on this machine that joins a berth server (a fleet node).
    #[command(
        after_help = "Example:\n  berth agent --join http://10.0.0.1:7777 --token $(ssh server berth token) --label zone=east\n  berth agent --join http://10.0.0.1:7777 --node-id web-2 --data /var/lib/berth-agent\n\nThe token is needed once: the node's own credential is kept in the data dir."
    )]
    Agent(crate::cmd::agent::AgentArgs),
    /// List the cluster's nodes with their state, labels and facts.
    #[command(
        after_help = "Example:\n  berth nodes\n  berth nodes --json | jq '.[] | {id, load: .facts.load_1m}'\n  berth nodes --format ansible > inventory.ini"
    )]
    Nodes(crate::cmd::nodes::NodesArgs),
    /// Drain, activate or remove a node.
    #[command(
        after_help = "Example:\n  berth node drain web-2      # move its instances elsewhere, place nothing new\n  berth node activate web-2\n  berth node rm web-2         # revoke its credential, move its instances"
    )]
    Node(crate::cmd::node::NodeArgs),
    /// Print the join token agents need (`berth agent --join URL --token T`).
    #[command(after_help = "Example:\n  berth token\n  berth token --rotate")]
    Token(crate::cmd::node::TokenArgs),
    /// Show what happened: deploys, rollbacks, scaling, instance starts, health changes, exits.
    #[command(
        after_help = "Example:\n  berth events                 # the last 50 events\n  berth events -f              # and keep following\n  berth events -p shop --kind instance_exited,rolled_back --json"
    )]
    Events(crate::cmd::events::EventsArgs),
    /// A live view of a stack's instances: state, CPU, memory, requests/s, restarts.
    #[command(
        after_help = "Example:\n  berth top            # refreshes every 2 s; Ctrl-C to quit\n  berth top --once     # print once (for scripts)"
    )]
    Top(crate::cmd::top::TopArgs),
    /// Print the CLI's version (and the server's, when one answers).
    #[command(after_help = "Example:\n  berth version\n  berth version --json")]
    Version,
    /// Print the web dashboard's URL and open it when there is a display.
    #[command(after_help = "Example:\n  berth dashboard\n  berth dashboard --no-open")]
    Dashboard(DashboardArgs),
}

/// `berth dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Only print the URL, even when a display is available.
    #[arg(long)]
    pub no_open: bool,
}

/// `berth up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Detached: return once every service is running and healthy.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// With -d: how long to wait for health (e.g. 60s, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: std::time::Duration,
}

/// `berth deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Only print what would change (added, replaced, scaled, removed, and why).
    #[arg(long)]
    pub dry_run: bool,
    /// Release message.
    #[arg(short = 'm', long, value_name = "MESSAGE")]
    pub message: Option<String>,
    /// Return once the release is created, without waiting for the rollout.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// How long to wait for the rollout (e.g. 5m).
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: std::time::Duration,
}

/// `berth releases`.
#[derive(Debug, Args)]
pub struct ReleasesArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Only releases that changed this service.
    #[arg(value_name = "SERVICE")]
    pub service: Option<String>,
}

/// `berth rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Release to restore (`v3` or `3`); default: the one before the current.
    #[arg(value_name = "VERSION", value_parser = parse_version)]
    pub version: Option<u64>,
    /// Return without waiting for the rollout.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// How long to wait for the rollout.
    #[arg(long, default_value = "5m", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_timeout: std::time::Duration,
}

/// `berth env`.
#[derive(Debug, Args)]
pub struct EnvArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Only this service (default: every service).
    #[arg(short = 's', long, global = true, value_name = "SERVICE")]
    pub service: Option<String>,
    /// Return without waiting for the rollout.
    #[arg(short = 'd', long, global = true)]
    pub detach: bool,
    /// set / unset; lists the environment when absent.
    #[command(subcommand)]
    pub action: Option<EnvAction>,
}

/// `berth env set|unset`.
#[derive(Debug, Subcommand)]
pub enum EnvAction {
    /// Set variables: KEY=VALUE...
    #[command(after_help = "Example:\n  berth env set LOG_LEVEL=debug FEATURE_X=on")]
    Set {
        /// KEY=VALUE pairs.
        #[arg(value_name = "KEY=VALUE", required = true, value_parser = parse_var)]
        vars: Vec<(String, String)>,
    },
    /// Remove variables: KEY...
    #[command(after_help = "Example:\n  berth env unset LOG_LEVEL")]
    Unset {
        /// Variable names.
        #[arg(value_name = "KEY", required = true)]
        keys: Vec<String>,
    },
}

/// `berth ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Every stack of the namespace.
    #[arg(short = 'a', long = "all-stacks")]
    pub all: bool,
}

/// `berth services`.
#[derive(Debug, Args)]
pub struct CatalogArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Every stack of the namespace.
    #[arg(short = 'a', long = "all-stacks")]
    pub all: bool,
    /// Only this service.
    #[arg(value_name = "SERVICE")]
    pub service: Option<String>,
}

/// `berth logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Stack file (repeatable). `-f` means --follow here, as in Compose.
    #[arg(long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Stack name (default: the stack file's, else the only stack running).
    #[arg(short = 'p', long = "project-name", value_name = "NAME")]
    pub project: Option<String>,
    /// Enable services of this profile (repeatable).
    #[arg(long = "profile", value_name = "PROFILE")]
    pub profiles: Vec<String>,
    /// Keep streaming new lines.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of the past.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only lines since a time: 10m, 1h30m, 2024-05-01T12:00:00Z, or Unix seconds.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print lines without the `service.N |` prefix.
    #[arg(long)]
    pub no_prefix: bool,
    /// Only lines matching this regex (e.g. 'ERROR|WARN', '(?i)timeout').
    #[arg(long, value_name = "PATTERN")]
    pub grep: Option<String>,
    /// Services to show (all when none).
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,
}

impl LogsArgs {
    /// The stack selection, in the shape the other commands use.
    pub fn stack(&self) -> StackArgs {
        StackArgs {
            files: self.files.clone(),
            project: self.project.clone(),
            profiles: self.profiles.clone(),
        }
    }
}

/// `berth stop|start|restart`.
#[derive(Debug, Args)]
pub struct ServicesArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Services (all when none).
    #[arg(value_name = "SERVICE")]
    pub services: Vec<String>,
}

/// `berth down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Also delete the stack's named volumes.
    #[arg(short = 'v', long)]
    pub volumes: bool,
    /// How long to wait for instances to stop.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: std::time::Duration,
}

/// `berth scale`.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// SERVICE=N pairs.
    #[arg(value_name = "SERVICE=N", required = true, value_parser = parse_scale)]
    pub replicas: Vec<(String, u32)>,
}

/// `berth config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Which stack.
    #[command(flatten)]
    pub stack: StackArgs,
    /// Print only the service names, one per line.
    #[arg(long)]
    pub services: bool,
}

/// `berth server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TCP address for the API (repeatable). Non-loopback addresses require the
    /// token. Default: a free port on 127.0.0.1, written to <data-dir>/server.json.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0", value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,
    /// Only the Unix socket, no TCP listener.
    #[arg(long, conflicts_with = "listen")]
    pub no_tcp: bool,
    /// Do not run instances on this machine (a server of a fleet whose
    /// work runs on joined agents).
    #[arg(long)]
    pub no_agent: bool,
    /// This node's id (default: the host name).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// Address of the HTTP router (`<service>.<stack>.localhost` and the
    /// stack file's routes). Use `0.0.0.0:80` to serve a real domain as root.
    #[arg(
        long,
        value_name = "ADDR",
        env = "BERTH_HTTP",
        default_value = "127.0.0.1:8080",
        value_parser = parse_addr
    )]
    pub http: SocketAddr,
    /// No HTTP router.
    #[arg(long)]
    pub no_http: bool,
    /// Address of the DNS server for `<service>.<stack>.<namespace>.berth`.
    #[arg(
        long,
        value_name = "ADDR",
        env = "BERTH_DNS",
        default_value = "127.0.0.1:8600",
        value_parser = parse_addr
    )]
    pub dns: SocketAddr,
    /// No DNS server.
    #[arg(long)]
    pub no_dns: bool,
    /// Also serve the Consul-compatible API (KV, catalog, health, sessions,
    /// agent) on this address, e.g. 127.0.0.1:8500, where Consul clients and
    /// Prometheus's consul_sd look by default. Off unless given; the same
    /// routes are always on the API listeners.
    #[arg(long, value_name = "ADDR", env = "BERTH_CONSUL_LISTEN", value_parser = parse_addr)]
    pub consul_listen: Option<SocketAddr>,
    /// Where state lives: `embedded` (a file in the data dir) or
    /// `etcd://host:2379,host2:2379[/prefix]?ca=..&cert=..&key=..&user=..&password-file=..`.
    #[arg(
        long,
        value_name = "URL",
        env = "BERTH_STORE",
        default_value = "embedded"
    )]
    pub store: String,
    /// Size at which an instance's log file is rotated (e.g. 10M, 512k).
    #[arg(
        long,
        value_name = "SIZE",
        env = "BERTH_LOG_MAX_FILE_SIZE",
        default_value = "10M",
        value_parser = parse_size
    )]
    pub log_max_file_size: u64,
    /// Log files kept per instance, the current one included.
    #[arg(
        long,
        value_name = "N",
        env = "BERTH_LOG_MAX_FILES",
        default_value = "5",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub log_max_files: u32,
    /// Time between two samples of the built-in metrics history (`berth
    /// top`, the dashboard's charts); 360 samples are kept.
    #[arg(
        long,
        value_name = "DURATION",
        env = "BERTH_HISTORY_INTERVAL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub history_interval: std::time::Duration,
    /// How long a node may be down (its lease expired) before its instances
    /// are started on other nodes. Longer rides out short outages without
    /// moving work; shorter recovers sooner.
    #[arg(
        long,
        value_name = "DURATION",
        env = "BERTH_RESCHEDULE_AFTER",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub reschedule_after: std::time::Duration,
    /// How often this server's own node refreshes its facts (load, memory,
    /// disk…), as `berth agent --facts-every` does for a joined node.
    #[arg(
        long,
        value_name = "DURATION",
        default_value = "15s",
        value_parser = parse_duration
    )]
    pub facts_every: std::time::Duration,
    /// Serve the dashboard to browsers without the token. Only allowed when
    /// every --listen address is loopback; other local users can then use it.
    #[arg(long)]
    pub dashboard_no_auth: bool,
    /// The IP other nodes reach this server's own instances on (its local
    /// agent registers it). Default 127.0.0.1, which only this machine
    /// reaches: set it when agents on other machines join, or use --no-agent.
    #[arg(long, value_name = "IP", env = "BERTH_ADVERTISE")]
    pub advertise: Option<std::net::IpAddr>,
}

/// `10M`, `512k`, `1g`, `4096` → bytes (the stack file's size syntax).
pub fn parse_size(s: &str) -> Result<u64, String> {
    berth_spec::units::parse_size(s)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 10M, 512k, 1G)"))
}

/// `web=3` → (`web`, 3).
pub fn parse_scale(s: &str) -> Result<(String, u32), String> {
    let (service, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE=N (e.g. web=3)"))?;
    if service.is_empty() {
        return Err(format!("{s:?} has no service name before '=' (e.g. web=3)"));
    }
    let n: u32 = n.trim().parse().map_err(|_| {
        format!("{s:?}: replicas must be a whole number ≥ 0, got {n:?} (e.g. {service}=3)")
    })?;
    Ok((service.to_owned(), n))
}

/// `v3` or `3` → 3.
pub fn parse_version(s: &str) -> Result<u64, String> {
    let n = s.strip_prefix('v').unwrap_or(s);
    match n.parse::<u64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!("{s:?} is not a release (e.g. v3)")),
    }
}

/// `KEY=VALUE` → (`KEY`, `VALUE`); the value may be empty or hold `=`.
pub fn parse_var(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "{s:?} is not KEY=VALUE (e.g. LOG_LEVEL=debug; use `berth env unset KEY` to remove)"
        )),
    }
}

/// `127.0.0.1:8080`, `[::1]:8080`, `0.0.0.0:80` → a socket address. A host
/// name is refused: a listener binds an address, not a name.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!(
            "{s:?} is not IP:PORT (e.g. 127.0.0.1:7777, 0.0.0.0:80 for every interface, \
             [::1]:7777; port 0 picks a free one)"
        )
    })
}

/// `90s`, `1m30s`, `2m`, `1h`, `500ms`: the stack file's duration syntax
/// ([`berth_spec::units`]), so flags and files accept the same durations.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    berth_spec::units::parse_duration_ns(s)
        .and_then(|ns| u64::try_from(ns).ok())
        .map(std::time::Duration::from_nanos)
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 30s, 1m30s, 2m, 1h, 500ms)"))
}
