//! `berth node drain|activate|rm NODE` and `berth token`.

use berth_model::api::{JoinTokenResponse, NodeChangeResponse};
use clap::{Args, Subcommand};
use hyper::Method;

use crate::client::enc;
use crate::exit;
use crate::output::{print_json, print_line};
use crate::settings::Settings;

/// `berth node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: NodeAction,
}

/// `berth node …` actions.
#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Place nothing new on the node and move its instances elsewhere, the
    /// way a rolling update replaces them (update order, health).
    Drain {
        /// Node id (`berth nodes` lists them).
        node: String,
    },
    /// Let the scheduler place instances on the node again.
    Activate {
        /// Node id.
        node: String,
    },
    /// Remove the node: revoke its credential (its agent stops its
    /// instances and exits) and move its instances elsewhere.
    Rm {
        /// Node id.
        node: String,
    },
}

/// `berth token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Replace the join token (nodes that already joined are not affected).
    #[arg(long)]
    pub rotate: bool,
}

/// Run a node action.
pub async fn run(settings: &Settings, args: &NodeArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let (method, path) = match &args.action {
        NodeAction::Drain { node } => (Method::POST, format!("/v1/nodes/{}/drain", enc(node))),
        NodeAction::Activate { node } => {
            (Method::POST, format!("/v1/nodes/{}/activate", enc(node)))
        }
        NodeAction::Rm { node } => (Method::DELETE, format!("/v1/nodes/{}", enc(node))),
    };
    let r: NodeChangeResponse = client.call::<(), _>(method, &path, None).await?;
    if settings.json {
        print_json(&r)?;
        return Ok(exit::OK);
    }
    let s = |n: usize| if n == 1 { "" } else { "s" };
    let text = match r.result.as_str() {
        "draining" => format!(
            "node {} is draining: its {} instance{} move elsewhere",
            r.node,
            r.instances,
            s(r.instances)
        ),
        "removed" => format!(
            "node {} removed: credential revoked, {} instance{} moved elsewhere",
            r.node,
            r.instances,
            s(r.instances)
        ),
        _ => format!("node {} is active", r.node),
    };
    print_line(text)?;
    Ok(exit::OK)
}

/// Print (or rotate) the join token.
pub async fn token(settings: &Settings, args: &TokenArgs) -> anyhow::Result<u8> {
    let client = settings.client();
    let r: JoinTokenResponse = if args.rotate {
        client.post("/v1/join-token/rotate", &()).await?
    } else {
        client.get("/v1/join-token").await?
    };
    if settings.json {
        print_json(&r)?;
    } else {
        print_line(&r.token)?;
    }
    Ok(exit::OK)
}
