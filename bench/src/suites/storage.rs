//! The `storage` suite: sequential 1 MiB writes and reads and random 4 KiB
//! reads through StorageClient against one chain of three storage nodes on
//! loopback (in this process, each with its own chunk engine on the same
//! disk), side by side with direct file I/O of the same amount on that disk.
//!
//! A chain of three on one disk writes every byte three times, so the write
//! limit is the direct write bandwidth / 3; reads are served by one replica,
//! so the read limit is the direct read bandwidth.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use r3fs_client::storage::StorageClientConfig;
use r3fs_client::StorageClient;
use r3fs_net::{Router, RpcServer, ServerConfig};
use r3fs_storage::chunk::ChunkEngine;
use r3fs_storage::craq::StorageService;
use r3fs_wire::meta::Layout;
use r3fs_wire::mgmt::*;
use tokio::sync::watch;

use crate::report::{ratio, result, Phase, Table};

const SUITE: &str = "storage";
const BLOCK: usize = 1 << 20;
const SMALL: usize = 4096;
const CHUNK: u32 = 1 << 20;

#[derive(clap::Args)]
pub struct StorageArgs {
    /// MiB written and read sequentially by each side.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Random 4 KiB reads by each side.
    #[arg(long, default_value_t = 4000)]
    random_reads: u64,
    /// Concurrent requests for the random reads.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// 1 MiB blocks in flight for the sequential write and read at depth
    /// (as a client with write-back or readahead keeps them); depth 1 is
    /// always measured too.
    #[arg(long, default_value_t = 8)]
    depth: usize,
}

struct Chain3 {
    client: StorageClient,
    _servers: Vec<RpcServer>,
    _tx: watch::Sender<Option<Arc<RoutingInfo>>>,
}

async fn start_chain(dir: &Path) -> anyhow::Result<Chain3> {
    let (tx, rx) = watch::channel(None);
    let mut servers = Vec::new();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 0..3u64 {
        let engine = Arc::new(ChunkEngine::open(dir.join(format!("target{i}")), CHUNK)?);
        let service =
            StorageService::new(i as u32 + 1, HashMap::from([(101 + i, engine)]), rx.clone());
        let mut router = Router::new();
        service.register(&mut router);
        let server = RpcServer::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            router,
            ServerConfig::default(),
        )
        .await?;
        addrs.push(server.local_addr());
        servers.push(server);
    }
    let routing = RoutingInfo {
        version: 1,
        epoch: 1,
        nodes: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| NodeInfo {
                id: i as u32 + 1,
                node_type: NodeType::Storage,
                address: a.to_string(),
                hostname: "bench".into(),
                registered_at: 0,
                last_heartbeat: 0,
                alive: true,
            })
            .collect(),
        chain_tables: vec![],
        chains: vec![Chain {
            id: 1,
            version: 1,
            targets: (0..3)
                .map(|i| ChainTarget {
                    target: 101 + i,
                    state: PublicState::Serving,
                })
                .collect(),
        }],
        targets: (0..3)
            .map(|i| TargetInfo {
                id: 101 + i,
                node: i as u32 + 1,
                chain: Some(1),
                public_state: PublicState::Serving,
                local_state: LocalState::UpToDate,
            })
            .collect(),
    };
    tx.send_replace(Some(Arc::new(routing)));
    let client = StorageClient::new(rx, StorageClientConfig::default());
    Ok(Chain3 {
        client,
        _servers: servers,
        _tx: tx,
    })
}

fn layout() -> Layout {
    Layout {
        chunk_size: CHUNK,
        stripe: 1,
        chains: vec![1],
    }
}

fn block(i: u64) -> Bytes {
    Bytes::from(vec![(i % 251) as u8; BLOCK])
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("create a data directory")?;
    let blocks = args.size_mib.max(1);
    let mib = blocks as f64;
    println!(
        "storage suite: {blocks} MiB sequential in 1 MiB blocks, {} random 4 KiB reads at concurrency {}; \
         StorageClient -> chain of 3 on 127.0.0.1 (chunk 1 MiB, every version fsynced) vs direct file I/O on the same disk ({}); unpinned",
        args.random_reads, args.concurrency, dir.path().display()
    );
    // Direct: the limits.
    let path = dir.path().join("direct");
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(&path)?;
        for i in 0..blocks {
            f.write_all(&block(i))?;
        }
        f.sync_all()?;
    }
    let direct_write = mib / t.elapsed().as_secs_f64();
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; BLOCK];
        for _ in 0..blocks {
            f.read_exact(&mut buf)?;
        }
    }
    let direct_read = mib / t.elapsed().as_secs_f64();
    let mut lat = Vec::new();
    let t = Instant::now();
    {
        let mut f = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; SMALL];
        for _ in 0..args.random_reads {
            let off = rand::random_range(0..blocks * BLOCK as u64 / SMALL as u64) * SMALL as u64;
            let s = Instant::now();
            f.seek(SeekFrom::Start(off))?;
            f.read_exact(&mut buf)?;
            lat.push(s.elapsed().as_nanos() as u64);
        }
    }
    let direct_random = Phase {
        ops: args.random_reads,
        elapsed: t.elapsed(),
        latencies_ns: lat,
    };

    // Through the chain.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (chain_write, chain_read, chain_random) = runtime.block_on(async {
        let chain = start_chain(dir.path()).await?;
        let c = &chain.client;
        let write1 = seq(c, blocks, 1, true).await?;
        let read1 = seq(c, blocks, 1, false).await?;
        let write = seq(c, blocks, args.depth, true).await?;
        let read = seq(c, blocks, args.depth, false).await?;
        let per_task = (args.random_reads / args.concurrency as u64).max(1);
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for _ in 0..per_task {
                    let off =
                        rand::random_range(0..blocks * BLOCK as u64 / SMALL as u64) * SMALL as u64;
                    let s = Instant::now();
                    c.read(&layout(), 1, off, SMALL as u64).await?;
                    lat.push(s.elapsed().as_nanos() as u64);
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for task in tasks {
            lat.extend(task.await??);
        }
        let random = Phase {
            ops: lat.len() as u64,
            elapsed: t.elapsed(),
            latencies_ns: lat,
        };
        Ok::<_, anyhow::Error>(((write1, write), (read1, read), random))
    })?;
    let ((chain_write1, chain_write), (chain_read1, chain_read)) = (chain_write, chain_read);

    let mut table = Table::new(&[
        "workload",
        "direct (same disk)",
        "chain of 3",
        "limit",
        "vs limit",
    ]);
    let write_limit = direct_write / 3.0;
    let d = args.depth;
    let rows = [
        (
            "seq write MiB/s, depth 1".to_string(),
            direct_write,
            chain_write1,
            write_limit,
        ),
        (
            format!("seq write MiB/s, depth {d}"),
            direct_write,
            chain_write,
            write_limit,
        ),
        (
            "seq read MiB/s, depth 1".to_string(),
            direct_read,
            chain_read1,
            direct_read,
        ),
        (
            format!("seq read MiB/s, depth {d}"),
            direct_read,
            chain_read,
            direct_read,
        ),
    ];
    for (name, direct, chain, limit) in rows {
        table.row(vec![
            name,
            format!("{direct:.0}"),
            format!("{chain:.0}"),
            format!("{limit:.0}"),
            format!("{:.2}", chain / limit),
        ]);
    }
    table.row(vec![
        "rand 4K read IOPS".into(),
        format!("{:.0}", direct_random.ops_per_sec()),
        format!("{:.0}", chain_random.ops_per_sec()),
        "-".into(),
        "-".into(),
    ]);
    table.row(vec![
        "rand 4K mean/p99 µs".into(),
        format!(
            "{:.1}/{:.1}",
            direct_random.mean_us(),
            direct_random.p99_us()
        ),
        format!("{:.1}/{:.1}", chain_random.mean_us(), chain_random.p99_us()),
        "-".into(),
        "-".into(),
    ]);
    table.print();
    result(SUITE, "direct_write", direct_write, "MiB/s");
    result(SUITE, "direct_read", direct_read, "MiB/s");
    result(SUITE, "direct_rand4k", direct_random.ops_per_sec(), "IOPS");
    result(SUITE, "chain_write_depth1", chain_write1, "MiB/s");
    result(SUITE, "chain_read_depth1", chain_read1, "MiB/s");
    result(SUITE, "chain_write", chain_write, "MiB/s");
    result(SUITE, "chain_read", chain_read, "MiB/s");
    result(SUITE, "chain_rand4k", chain_random.ops_per_sec(), "IOPS");
    result(SUITE, "chain_rand4k_p99", chain_random.p99_us(), "us");
    ratio(SUITE, "write_vs_limit", chain_write / write_limit);
    ratio(SUITE, "read_vs_limit", chain_read / direct_read);
    Ok(())
}

/// MiB/s of `blocks` sequential 1 MiB writes (or reads) with `depth` in flight.
async fn seq(c: &StorageClient, blocks: u64, depth: usize, write: bool) -> anyhow::Result<f64> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    let t = Instant::now();
    stream::iter(0..blocks)
        .map(|i| async move {
            if write {
                c.write(&layout(), 1, i * BLOCK as u64, block(i)).await?;
            } else {
                let data = c.read(&layout(), 1, i * BLOCK as u64, BLOCK as u64).await?;
                anyhow::ensure!(
                    data.len() == BLOCK && data[0] == (i % 251) as u8,
                    "block {i} read back wrong"
                );
            }
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(depth.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(blocks as f64 / t.elapsed().as_secs_f64())
}
