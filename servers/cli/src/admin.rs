//! `r3fs admin`: operate a cluster through mgmtd. Commands are named as in
//! 3FS's admin tool. Human-readable tables by default, `--json` for scripts.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Subcommand;
use r3fs_client::MgmtClient;
use r3fs_wire::mgmt::{Chain, CreateChainTableRequest, Millis, RoutingInfo};
use serde::Serialize;

#[derive(clap::Args)]
pub struct AdminArgs {
    /// mgmtd addresses (any instance; calls find the primary).
    #[arg(
        long = "mgmtd",
        env = "R3FS_MGMTD",
        value_delimiter = ',',
        default_value = "127.0.0.1:9200"
    )]
    servers: Vec<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Which mgmtd holds the primary lease.
    ShowPrimary,
    /// Registered nodes: type, address, liveness.
    ListNodes,
    /// Chain tables and their chains.
    ListChainTables,
    /// Chains: targets in order with their public states, and the chain version.
    ListChains,
    /// Targets: node, chain, public and local state.
    ListTargets,
    /// Client sessions mgmtd keeps.
    ListClients,
    /// Build a chain table over the registered storage targets not yet in a chain.
    CreateChainTable {
        /// Table id.
        #[arg(long, default_value_t = 1)]
        table: u32,
        /// Replicas per chain (targets on distinct nodes).
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        /// Number of chains [default: as many as the free targets allow].
        #[arg(long)]
        chains: Option<u32>,
    },
    /// Take a target offline: its chain stops using it until it resyncs.
    OfflineTarget { target: u64 },
    /// Remove a node that is down and has no target in a chain.
    UnregisterNode { node: u32 },
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(run_cmd(args))
}

async fn run_cmd(args: AdminArgs) -> anyhow::Result<()> {
    let client = MgmtClient::new(args.servers.clone())?;
    let routing = || async {
        client
            .routing_info(0, std::time::Duration::ZERO)
            .await
            .with_context(|| format!("get routing info from mgmtd at {:?}", args.servers))?
            .context("mgmtd returned no routing info")
    };
    let json = args.json;
    match args.cmd {
        AdminCmd::ShowPrimary => {
            let p = client
                .primary()
                .await
                .with_context(|| format!("reach mgmtd at {:?}", args.servers))?;
            if json {
                return print_json(&p);
            }
            match (p.primary, p.primary_address) {
                (Some(id), Some(addr)) => println!(
                    "primary: node {id} at {addr}, epoch {}, lease {}",
                    p.epoch,
                    until(p.lease_expires)
                ),
                _ => println!("no primary holds the lease (asked node {})", p.this_node),
            }
        }
        AdminCmd::ListNodes => {
            let r = routing().await?;
            if json {
                return print_json(&r.nodes);
            }
            let rows = r.nodes.iter().map(|n| {
                vec![
                    n.id.to_string(),
                    format!("{:?}", n.node_type),
                    n.address.clone(),
                    n.hostname.clone(),
                    if n.alive {
                        "alive".into()
                    } else {
                        "DOWN".into()
                    },
                    ago(n.last_heartbeat),
                ]
            });
            table(
                &["ID", "TYPE", "ADDRESS", "HOST", "STATE", "HEARTBEAT"],
                rows,
            );
        }
        AdminCmd::ListChainTables => {
            let r = routing().await?;
            if json {
                return print_json(&r.chain_tables);
            }
            let rows = r.chain_tables.iter().map(|t| {
                vec![
                    t.id.to_string(),
                    t.replicas.to_string(),
                    t.chains.len().to_string(),
                    format!("{:?}", t.chains),
                ]
            });
            table(&["TABLE", "REPLICAS", "CHAINS", "CHAIN IDS"], rows);
        }
        AdminCmd::ListChains => {
            let r = routing().await?;
            if json {
                return print_json(&r.chains);
            }
            chains_table(&r.chains);
        }
        AdminCmd::ListTargets => {
            let r = routing().await?;
            if json {
                return print_json(&r.targets);
            }
            targets_table(&r);
        }
        AdminCmd::ListClients => {
            let sessions = client.list_sessions().await?;
            if json {
                return print_json(&sessions);
            }
            let rows = sessions.iter().map(|s| {
                vec![
                    format!("{:016x}", s.client),
                    s.description.clone(),
                    ago(s.created),
                    until(s.expires),
                ]
            });
            table(&["CLIENT", "DESCRIPTION", "CREATED", "EXPIRES"], rows);
        }
        AdminCmd::CreateChainTable {
            table: id,
            replicas,
            chains,
        } => {
            let t = client
                .create_chain_table(CreateChainTableRequest {
                    table: id,
                    replicas,
                    chains,
                })
                .await?;
            if json {
                return print_json(&t);
            }
            println!(
                "created chain table {} with {} chains of {} replicas: {:?}",
                t.id,
                t.chains.len(),
                t.replicas,
                t.chains
            );
        }
        AdminCmd::OfflineTarget { target } => {
            client.offline_target(target).await?;
            if !json {
                println!("target {target} taken offline");
            }
        }
        AdminCmd::UnregisterNode { node } => {
            client.unregister_node(node).await?;
            if !json {
                println!("node {node} unregistered");
            }
        }
    }
    Ok(())
}

/// Chains with their targets head first, each with its public state.
pub(crate) fn chains_table(chains: &[Chain]) {
    let rows = chains.iter().map(|c| {
        let targets: Vec<String> = c
            .targets
            .iter()
            .map(|t| format!("{}({:?})", t.target, t.state))
            .collect();
        vec![
            c.id.to_string(),
            c.version.to_string(),
            targets.join(" -> "),
        ]
    });
    table(&["CHAIN", "VERSION", "TARGETS (head first)"], rows);
}

fn targets_table(r: &RoutingInfo) {
    let rows = r.targets.iter().map(|t| {
        vec![
            t.id.to_string(),
            t.node.to_string(),
            t.chain.map_or("-".into(), |c| c.to_string()),
            format!("{:?}", t.public_state),
            format!("{:?}", t.local_state),
        ]
    });
    table(&["TARGET", "NODE", "CHAIN", "PUBLIC", "LOCAL"], rows);
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints `rows` under `header`, each column as wide as its widest cell.
pub(crate) fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let width: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([header[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn ago(at: Millis) -> String {
    if at == 0 {
        return "-".into();
    }
    let now = r3fs_wire::mgmt::now_millis();
    format!("{:.1}s ago", now.saturating_sub(at) as f64 / 1000.0)
}

fn until(at: Millis) -> String {
    let now = r3fs_wire::mgmt::now_millis();
    format!("in {:.1}s", at.saturating_sub(now) as f64 / 1000.0)
}
