//! The `meta` suite: namespace operations through MetaClient against a meta
//! server on loopback with the embedded engine, at the default durability
//! (every acknowledged commit fsynced, group commit).
//!
//! For each client count (default 1 and 8) a fresh server and engine are
//! started; each client is its own MetaClient with its own connections and
//! runs a closed loop (one call in flight). Phases, in order, all in one
//! shared directory so that concurrent clients contend the way a busy
//! directory does: create, stat (lookup by name), rename, unlink; plus
//! listings of a separate 1,000-entry directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use r3fs_client::{MetaClient, MetaClientConfig};
use r3fs_kv::embedded::{Durability, EmbeddedConfig, EmbeddedEngine};
use r3fs_meta::{MetaConfig, MetaStore};
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_wire::meta::{
    CreateRequest, InodeId, OpenFlags, ReadDirRequest, RenameFlags, RenameRequest, User, ROOT_INODE,
};

use crate::report::{ratio, result, Phase, Table};

const SUITE: &str = "meta";
/// Entries in the directory the readdir phase lists.
const READDIR_ENTRIES: usize = 1000;
/// The aims on this 2-core machine, with 8 clients.
const CREATE_AIM_OPS_PER_SEC: f64 = 10_000.0;
const STAT_AIM_OPS_PER_SEC: f64 = 50_000.0;

#[derive(clap::Args)]
pub struct MetaArgs {
    /// Operations per phase, split evenly over the clients.
    #[arg(long, default_value_t = 40_000)]
    ops: u64,
    /// Listings of the 1,000-entry directory per client count.
    #[arg(long, default_value_t = 400)]
    listings: u64,
    /// Client counts to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    clients: Vec<usize>,
    /// Directory for the engine's files [default: a fresh temporary directory].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

struct Server {
    addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    server: Option<RpcServer>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(base: Option<&PathBuf>) -> anyhow::Result<Server> {
        let dir = match base {
            Some(b) => tempfile::tempdir_in(b),
            None => tempfile::tempdir(),
        }
        .context("create the engine's data directory")?;
        let mut ecfg = EmbeddedConfig::new(dir.path());
        ecfg.durability = Durability::Sync;
        let engine = Arc::new(EmbeddedEngine::open(ecfg).context("open the embedded engine")?);
        let store = Arc::new(MetaStore::new(
            engine,
            MetaConfig::default(),
            Some(dir.path().to_path_buf()),
        )?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("meta-server")
            .enable_all()
            .build()?;
        let server = runtime.block_on(async {
            let mut router = Router::new();
            r3fs_meta::server::register(&mut router, store);
            RpcServer::bind(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                router,
                ServerConfig::default(),
            )
            .await
        })?;
        Ok(Server {
            addr: server.local_addr(),
            runtime,
            server: Some(server),
            _dir: dir,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.runtime.block_on(server.shutdown());
        }
    }
}

pub fn run(args: MetaArgs) -> anyhow::Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs positive counts");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("meta-bench-client")
        .enable_all()
        .build()?;
    println!(
        "meta suite: MetaClient -> meta server on 127.0.0.1, embedded engine, durability sync (group commit); {} ops per phase, {} cores, unpinned",
        args.ops,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut table = Table::new(&["operation", "clients", "ops/s", "mean µs", "p99 µs"]);
    let mut lines = Vec::new();
    for &clients in &args.clients {
        let server = Server::start(args.data_dir.as_ref())?;
        let phases = runtime.block_on(run_clients(server.addr, clients, &args))?;
        for (name, phase) in phases {
            table.row(vec![
                name.to_string(),
                clients.to_string(),
                format!("{:.0}", phase.ops_per_sec()),
                format!("{:.1}", phase.mean_us()),
                format!("{:.1}", phase.p99_us()),
            ]);
            lines.push((
                name,
                clients,
                phase.ops_per_sec(),
                phase.mean_us(),
                phase.p99_us(),
            ));
        }
    }
    table.print();
    for (name, clients, ops, mean, p99) in &lines {
        result(SUITE, &format!("{name}_c{clients}"), *ops, "ops/s");
        result(SUITE, &format!("{name}_c{clients}_mean"), *mean, "us");
        result(SUITE, &format!("{name}_c{clients}_p99"), *p99, "us");
    }
    let at8 = |op: &str| lines.iter().find(|l| l.0 == op && l.1 == 8).map(|l| l.2);
    if let Some(v) = at8("create") {
        ratio(SUITE, "create_c8_vs_aim", v / CREATE_AIM_OPS_PER_SEC);
    }
    if let Some(v) = at8("stat") {
        ratio(SUITE, "stat_c8_vs_aim", v / STAT_AIM_OPS_PER_SEC);
    }
    Ok(())
}

async fn run_clients(
    addr: SocketAddr,
    clients: usize,
    args: &MetaArgs,
) -> anyhow::Result<Vec<(&'static str, Phase)>> {
    let user = User::root();
    let setup = MetaClient::new(MetaClientConfig::new(vec![addr]))?;
    let dir = setup.mkdir(&user, ROOT_INODE, b"bench", 0o755).await?.inode;
    let big = setup
        .mkdir(&user, ROOT_INODE, b"listing", 0o755)
        .await?
        .inode;
    for i in 0..READDIR_ENTRIES {
        setup
            .create(create_req(big, format!("entry{i:05}")))
            .await?;
    }
    let metas: Vec<MetaClient> = (0..clients)
        .map(|_| MetaClient::new(MetaClientConfig::new(vec![addr])))
        .collect::<Result<_, _>>()?;
    let per_client = (args.ops / clients as u64).max(1);
    let listings = (args.listings / clients as u64).max(1);
    let mut phases = Vec::new();
    phases.push((
        "create",
        phase(&metas, per_client, move |m, c, k| async move {
            m.create(create_req(dir, name(c, k))).await.map(drop)
        })
        .await?,
    ));
    phases.push((
        "stat",
        phase(&metas, per_client, move |m, c, k| async move {
            m.lookup(&User::root(), dir, name(c, k).as_bytes())
                .await
                .map(drop)
        })
        .await?,
    ));
    phases.push((
        "readdir1000",
        phase(&metas, listings, move |m, _c, _k| async move {
            let req = ReadDirRequest {
                user: User::root(),
                inode: big,
                after: None,
                limit: 0,
                plus: false,
            };
            let page = m.readdir(req).await?;
            assert_eq!(
                page.entries.len(),
                READDIR_ENTRIES,
                "the listing returns the whole directory"
            );
            Ok(())
        })
        .await?,
    ));
    phases.push((
        "rename",
        phase(&metas, per_client, move |m, c, k| async move {
            let req = RenameRequest {
                user: User::root(),
                parent: dir,
                name: name(c, k).into_bytes(),
                new_parent: dir,
                new_name: format!("r{}", name(c, k)).into_bytes(),
                flags: RenameFlags::default(),
            };
            m.rename(req).await
        })
        .await?,
    ));
    phases.push((
        "unlink",
        phase(&metas, per_client, move |m, c, k| async move {
            m.unlink(&User::root(), dir, format!("r{}", name(c, k)).as_bytes())
                .await
        })
        .await?,
    ));
    Ok(phases)
}

fn name(client: usize, k: u64) -> String {
    format!("c{client}-{k:08}")
}

fn create_req(parent: InodeId, name: String) -> CreateRequest {
    CreateRequest {
        user: User::root(),
        parent,
        name: name.into_bytes(),
        perm: 0o644,
        exclusive: true,
        flags: OpenFlags::default(),
        client: 0,
    }
}

/// Runs `op(client, client_index, k)` for k in 0..per_client on every client
/// at once, each client in a closed loop, and collects latencies.
async fn phase<F, Fut>(metas: &[MetaClient], per_client: u64, op: F) -> anyhow::Result<Phase>
where
    F: Fn(MetaClient, usize, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), r3fs_client::MetaClientError>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (c, m) in metas.iter().enumerate() {
        let m = m.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client as usize);
            for k in 0..per_client {
                let t = Instant::now();
                op(m.clone(), c, k).await?;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            Ok::<_, r3fs_client::MetaClientError>(lat)
        }));
    }
    let mut latencies_ns = Vec::new();
    for t in tasks {
        latencies_ns.extend(t.await.context("benchmark client task")??);
    }
    let elapsed = started.elapsed().max(Duration::from_nanos(1));
    Ok(Phase {
        ops: latencies_ns.len() as u64,
        elapsed,
        latencies_ns,
    })
}
