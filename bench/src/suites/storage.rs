//! The `storage` suite: sequential 1 MiB writes and reads and random 4 KiB
//! reads through StorageClient against one chain of three storage nodes on
//! loopback (in this process, each with its own chunk engine on the same
//! disk), side by side with direct I/O of the same amount on that disk.
//!
//! Both sides measure the device, never the page cache:
//! - the direct side uses `O_DIRECT` writes (then one `fdatasync`) and
//!   `O_DIRECT` reads, at the same depth as the chain side (threads);
//! - the chain side's chunk engines write their blocks with `O_DIRECT` and
//!   `fdatasync` every version (that is their durability), and before every
//!   read phase the bench syncs and evicts every file of the three targets
//!   (`posix_fadvise(DONTNEED)`), so the reads start cold.
//!
//! A chain of three on one disk writes every byte three times, so the write
//! limit is the direct write bandwidth / 3; reads are served by one replica,
//! so the read limit is the direct read bandwidth at the same depth.
//!
//! The host's write cache makes the disk's speed swing from one second to
//! the next, so each sequential workload runs as `--repeats` side-by-side
//! pairs, interleaved (direct, chain, direct, chain, ...), and the figures
//! are medians: the ratio is the median of the per-pair ratios. The blocks
//! written are built once, before any timing, so the bench's own buffer
//! filling counts against neither side.
//!
//! The write limit above is the disk streaming without syncs. Each round
//! also writes directly with an `fdatasync` after every block, the
//! durability a chain member gives every version before it is
//! acknowledged; a third of that rate is the limit for a chain of three that
//! keeps its promise (`RATIO storage write_vs_durable_limit`).
//!
//! A third side runs after every chain write at depth: the same blocks
//! through a relay of three RPC servers that checksum and pass the payload
//! on and store nothing ([`crate::suites::relay`]). Its rate bounds what
//! any chain write could reach here (`RATIO storage relay_vs_limit`).
//!
//! The client and the three servers share this process, so its CPU time
//! during a chain phase is the chain's CPU cost: the bench prints it per
//! MiB and as a share of the machine's CPUs. A share near 100% means the
//! chain is bound by CPU (checksums, copies, three RPC hops, syscalls), not
//! by the disk the limit describes.
//!
//! The RPC hops pass payloads through shared memory, as any two r3fs
//! processes on one host do (`r3fs_net::shared`); the bench prints how many
//! did. `R3FS_SHARED_PAYLOADS=off` keeps them on loopback TCP, the path
//! between hosts, for comparison.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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
use crate::suites::relay::RelayChain;

const SUITE: &str = "storage";
const BLOCK: usize = 1 << 20;
const SMALL: usize = 4096;
const CHUNK: u32 = 1 << 20;
/// Buffer alignment `O_DIRECT` needs.
const DIRECT_ALIGN: usize = 4096;

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
    /// Interleaved direct/chain pairs per sequential workload; the table
    /// and ratios report medians.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Distinct block contents; block `i` holds the byte `i % PATTERNS`.
const PATTERNS: u64 = 16;

/// One sequential workload measured as interleaved pairs.
#[derive(Default)]
struct Pairs {
    direct: Vec<f64>,
    chain: Vec<f64>,
    /// chain / limit of each pair.
    ratios: Vec<f64>,
    /// The chain phases' CPU use.
    cpu: Vec<ChainCpu>,
}

impl Pairs {
    fn push(&mut self, direct: f64, chain: Measured, limit: f64) {
        self.direct.push(direct);
        self.chain.push(chain.mib_per_sec);
        self.ratios.push(chain.mib_per_sec / limit);
        self.cpu.push(chain.cpu);
    }

    fn cpu_ms_per_mib(&self) -> f64 {
        median(&self.cpu.iter().map(|c| c.ms_per_mib).collect::<Vec<_>>())
    }

    fn cpu_busy(&self) -> f64 {
        median(&self.cpu.iter().map(|c| c.busy).collect::<Vec<_>>())
    }

    fn switches_per_mib(&self) -> f64 {
        median(
            &self
                .cpu
                .iter()
                .map(|c| c.switches_per_mib)
                .collect::<Vec<_>>(),
        )
    }
}

/// A chain phase: its rate and the CPU this process used meanwhile.
struct Measured {
    mib_per_sec: f64,
    cpu: ChainCpu,
}

#[derive(Clone, Copy)]
struct ChainCpu {
    /// CPU time (user + system, all threads) per MiB moved.
    ms_per_mib: f64,
    /// CPU time over wall time × the machine's CPUs.
    busy: f64,
    /// Context switches (voluntary and not, all threads) per MiB moved:
    /// each is a thread going to sleep or being put aside.
    switches_per_mib: f64,
}

/// User + system CPU time of this process so far, and its context switches.
fn process_cpu() -> (std::time::Duration, u64) {
    // SAFETY: getrusage only fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    let switches = (usage.ru_nvcsw + usage.ru_nivcsw) as u64;
    (time(usage.ru_utime) + time(usage.ru_stime), switches)
}

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
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

/// The contents of every block, built before anything is timed.
fn blocks_by_pattern() -> Vec<Bytes> {
    (0..PATTERNS)
        .map(|p| Bytes::from(vec![p as u8; BLOCK]))
        .collect()
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("create a data directory")?;
    let blocks = args.size_mib.max(1);
    let d = args.depth.max(1);
    let repeats = args.repeats.max(1);
    println!(
        "storage suite: {blocks} MiB sequential in 1 MiB blocks at depth 1 and {d}, {} random 4 KiB reads at concurrency {}; \
         StorageClient -> chain of 3 on 127.0.0.1 (chunk 1 MiB, every version fdatasynced; payloads {}) vs O_DIRECT I/O on the same disk ({}); \
         sequential figures are medians of {repeats} interleaved direct/chain pairs; unpinned",
        args.random_reads,
        args.concurrency,
        match r3fs_net::shared::allowed_by_env() {
            true => "through shared memory between RPC peers",
            false => "on loopback TCP (R3FS_SHARED_PAYLOADS=off)",
        },
        dir.path().display()
    );
    let path = dir.path().join("direct");
    let data = blocks_by_pattern();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let targets = dir.path().to_path_buf();
    let chain = runtime.block_on(start_chain(dir.path()))?;
    let relay = runtime.block_on(RelayChain::start())?;
    let c = &chain.client;
    let mut write1 = Pairs::default();
    let mut write = Pairs::default();
    let mut read1 = Pairs::default();
    let mut read = Pairs::default();
    // The storage-free relay at depth `d`, right after each chain write at
    // that depth, against the same pair's limit.
    let mut relay_runs = Pairs::default();
    // Direct writes with an fdatasync per block at depth `d`: the limit a
    // chain making every version durable on this disk could reach.
    let mut durable = Pairs::default();
    for _ in 0..repeats {
        for (pairs, depth) in [(&mut write1, 1), (&mut write, d)] {
            let direct = direct_seq(&path, blocks, depth, Direct::Write)?;
            let chain = runtime.block_on(seq(c, &data, blocks, depth, true))?;
            pairs.push(direct, chain, direct / 3.0);
        }
        let relayed = runtime.block_on(relayed(&relay, &data, blocks, d))?;
        let rounds = relay_runs.chain.len() as u64 + 1;
        anyhow::ensure!(
            relay.passed() == [rounds * blocks; 3],
            "every relay server passes every block on: {:?}",
            relay.passed()
        );
        let direct = *write.direct.last().expect("just measured");
        relay_runs.push(direct, relayed, direct / 3.0);
        // The same disk with the chain's durability (a sync per block),
        // against the chain write at depth `d` of this round.
        let durable_direct = direct_seq(&path, blocks, d, Direct::DurableWrite)?;
        let chain = *write.chain.last().expect("just measured");
        durable.direct.push(durable_direct);
        durable.chain.push(chain);
        durable.ratios.push(chain / (durable_direct / 3.0));
    }
    for _ in 0..repeats {
        for (pairs, depth) in [(&mut read1, 1), (&mut read, d)] {
            let direct = direct_seq(&path, blocks, depth, Direct::Read)?;
            evict(&targets)?;
            let chain = runtime.block_on(seq(c, &data, blocks, depth, false))?;
            pairs.push(direct, chain, direct);
        }
    }
    let direct_random = direct_random_reads(&path, blocks, args.random_reads, args.concurrency)?;
    std::fs::remove_file(&path)?;
    evict(&targets)?;
    let chain_random = runtime.block_on(chain_random_reads(
        c,
        blocks,
        args.random_reads,
        args.concurrency,
    ))?;

    println!(
        "columns: direct = O_DIRECT 1 MiB pwrite (+1 fdatasync) / pread of one file at the same depth; \
         chain = StorageClient through 3 replicas, reads after evicting the targets' files from the page cache; \
         limit = direct / 3 for writes (3 copies on one disk), direct for reads (one replica serves); \
         sequential rows: median of {repeats} interleaved pairs, vs limit = median of the pairs' ratios (min..max); \
         relay = the same writes through 3 servers that only checksum and pass the payload on (no storage), \
         run after each depth-{d} chain write: the most a chain write could reach on this machine's CPUs; \
         'direct syncs each block' = direct writes with an fdatasync after every block (the durability every chain \
         version has before it is acknowledged), against the chain write of the same round"
    );
    let mut table = Table::new(&[
        "workload (median of pairs)",
        "direct O_DIRECT",
        "chain of 3 (cold)",
        "limit",
        "vs limit",
        "range",
    ]);
    let rows = [
        ("seq write MiB/s, depth 1".to_string(), &write1, 3.0),
        (format!("seq write MiB/s, depth {d}"), &write, 3.0),
        ("seq read MiB/s, depth 1".to_string(), &read1, 1.0),
        (format!("seq read MiB/s, depth {d}"), &read, 1.0),
        (format!("relay, no storage, depth {d}"), &relay_runs, 3.0),
        (
            format!("seq write MiB/s, depth {d}, direct syncs each block"),
            &durable,
            3.0,
        ),
    ];
    for (name, pairs, copies) in &rows {
        let lo = pairs.ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = pairs.ratios.iter().copied().fold(0.0, f64::max);
        table.row(vec![
            name.clone(),
            format!("{:.0}", median(&pairs.direct)),
            format!("{:.0}", median(&pairs.chain)),
            format!("{:.0}", median(&pairs.direct) / *copies),
            format!("{:.2}", median(&pairs.ratios)),
            format!("{lo:.2}..{hi:.2}"),
        ]);
    }
    table.row(vec![
        format!("rand 4K read IOPS, conc {}", args.concurrency),
        format!("{:.0}", direct_random.ops_per_sec()),
        format!("{:.0}", chain_random.ops_per_sec()),
        "-".into(),
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
        "-".into(),
    ]);
    table.print();
    println!(
        "chain CPU (client + 3 servers in this process, {} CPUs): {}",
        cpus(),
        rows.iter()
            .filter(|(_, pairs, _)| !pairs.cpu.is_empty())
            .map(|(name, pairs, _)| format!(
                "{name}: {:.2} ms/MiB, {:.0}% busy, {:.0} switches/MiB",
                pairs.cpu_ms_per_mib(),
                pairs.cpu_busy() * 100.0,
                pairs.switches_per_mib()
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    result(
        SUITE,
        "direct_write_depth1",
        median(&write1.direct),
        "MiB/s",
    );
    result(SUITE, "direct_write", median(&write.direct), "MiB/s");
    result(SUITE, "direct_read_depth1", median(&read1.direct), "MiB/s");
    result(SUITE, "direct_read", median(&read.direct), "MiB/s");
    result(SUITE, "direct_rand4k", direct_random.ops_per_sec(), "IOPS");
    result(SUITE, "chain_write_depth1", median(&write1.chain), "MiB/s");
    result(SUITE, "chain_read_depth1", median(&read1.chain), "MiB/s");
    result(SUITE, "chain_write", median(&write.chain), "MiB/s");
    result(SUITE, "chain_read", median(&read.chain), "MiB/s");
    result(SUITE, "chain_rand4k", chain_random.ops_per_sec(), "IOPS");
    result(SUITE, "relay_write", median(&relay_runs.chain), "MiB/s");
    result(
        SUITE,
        "direct_durable_write",
        median(&durable.direct),
        "MiB/s",
    );
    result(SUITE, "relay_cpu", relay_runs.cpu_ms_per_mib(), "ms/MiB");
    result(SUITE, "chain_rand4k_p99", chain_random.p99_us(), "us");
    result(SUITE, "chain_write_cpu", write.cpu_ms_per_mib(), "ms/MiB");
    result(SUITE, "chain_write_cpu_busy", write.cpu_busy() * 100.0, "%");
    result(SUITE, "chain_read_cpu", read.cpu_ms_per_mib(), "ms/MiB");
    result(
        SUITE,
        "chain_write_switches",
        write.switches_per_mib(),
        "per MiB",
    );
    let shared = r3fs_net::shared::totals();
    println!(
        "payloads through shared memory (all sides, both ways): {}; on the stream although a region was mapped \
         (no free slot, or larger than a slot): {}",
        shared.shared, shared.fallbacks
    );
    result(SUITE, "shared_payloads", shared.shared as f64, "payloads");
    result(
        SUITE,
        "shared_fallbacks",
        shared.fallbacks as f64,
        "payloads",
    );
    ratio(SUITE, "write_depth1_vs_limit", median(&write1.ratios));
    ratio(SUITE, "write_vs_limit", median(&write.ratios));
    ratio(SUITE, "read_vs_limit", median(&read.ratios));
    ratio(SUITE, "relay_vs_limit", median(&relay_runs.ratios));
    ratio(SUITE, "write_vs_durable_limit", median(&durable.ratios));
    Ok(())
}

/// A zeroed buffer of `len` bytes at a `DIRECT_ALIGN` boundary, inside `backing`.
fn aligned(backing: &mut Vec<u8>, len: usize) -> &mut [u8] {
    *backing = vec![0u8; len + DIRECT_ALIGN];
    let off = backing.as_ptr().align_offset(DIRECT_ALIGN);
    &mut backing[off..off + len]
}

fn open_direct(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// MiB/s of `blocks` 1 MiB `O_DIRECT` writes (then one `fdatasync`) or
/// reads of `path`, `depth` threads each taking every `depth`-th block.
/// How [`direct_seq`] moves its blocks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direct {
    Read,
    /// One `fdatasync` after the last block.
    Write,
    /// An `fdatasync` after every block, as a chunk engine makes every
    /// version durable before it is acknowledged.
    DurableWrite,
}

fn direct_seq(path: &Path, blocks: u64, depth: usize, mode: Direct) -> anyhow::Result<f64> {
    let write = mode != Direct::Read;
    let file = open_direct(path, write).with_context(|| format!("open {path:?} O_DIRECT"))?;
    let t = Instant::now();
    std::thread::scope(|s| {
        let mut workers = Vec::new();
        for w in 0..depth as u64 {
            let file = &file;
            workers.push(s.spawn(move || {
                let mut backing = Vec::new();
                let buf = aligned(&mut backing, BLOCK);
                for i in (w..blocks).step_by(depth) {
                    let at = i * BLOCK as u64;
                    if write {
                        buf.fill((i % PATTERNS) as u8);
                        file.write_all_at(buf, at)?;
                        if mode == Direct::DurableWrite {
                            file.sync_data()?;
                        }
                    } else {
                        file.read_exact_at(buf, at)?;
                        anyhow::ensure!(buf[0] == (i % PATTERNS) as u8, "direct block {i} wrong");
                    }
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("direct worker panicked"))
    })?;
    if write {
        file.sync_data()?;
    }
    Ok(blocks as f64 / t.elapsed().as_secs_f64())
}

/// Random 4 KiB `O_DIRECT` reads of `path` from `concurrency` threads.
fn direct_random_reads(
    path: &Path,
    blocks: u64,
    reads: u64,
    concurrency: usize,
) -> anyhow::Result<Phase> {
    let file = open_direct(path, false)?;
    let per_task = (reads / concurrency.max(1) as u64).max(1);
    let t = Instant::now();
    let lat = std::thread::scope(|s| {
        let mut workers = Vec::new();
        for _ in 0..concurrency.max(1) {
            let file = &file;
            workers.push(s.spawn(move || {
                let mut backing = Vec::new();
                let buf = aligned(&mut backing, SMALL);
                let mut lat = Vec::new();
                for _ in 0..per_task {
                    let off = rand::random_range(0..blocks * (BLOCK / SMALL) as u64) * SMALL as u64;
                    let s = Instant::now();
                    file.read_exact_at(buf, off)?;
                    lat.push(s.elapsed().as_nanos() as u64);
                }
                Ok::<_, std::io::Error>(lat)
            }));
        }
        let mut lat = Vec::new();
        for w in workers {
            lat.extend(w.join().expect("direct worker panicked")?);
        }
        Ok::<_, std::io::Error>(lat)
    })?;
    Ok(Phase {
        ops: lat.len() as u64,
        elapsed: t.elapsed(),
        latencies_ns: lat,
    })
}

/// Sync every file under `dir` and drop it from the page cache, so the
/// next reads come from the disk.
fn evict(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            evict(&path)?;
            continue;
        }
        let file = File::open(&path)?;
        file.sync_data()?;
        use std::os::fd::AsRawFd;
        // SAFETY: the fd is open for the duration of the call.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        anyhow::ensure!(rc == 0, "posix_fadvise {path:?}: error {rc}");
    }
    Ok(())
}

/// Random 4 KiB reads through the chain from `concurrency` tasks.
async fn chain_random_reads(
    c: &StorageClient,
    blocks: u64,
    reads: u64,
    concurrency: usize,
) -> anyhow::Result<Phase> {
    let per_task = (reads / concurrency.max(1) as u64).max(1);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..per_task {
                let off = rand::random_range(0..blocks * (BLOCK / SMALL) as u64) * SMALL as u64;
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
    Ok(Phase {
        ops: lat.len() as u64,
        elapsed: t.elapsed(),
        latencies_ns: lat,
    })
}

/// MiB/s (and CPU use) of `blocks` sequential 1 MiB writes (or reads) with
/// `depth` in flight.
/// Writes send `data[i % PATTERNS]` (shared, not copied) as block `i`.
async fn seq(
    c: &StorageClient,
    data: &[Bytes],
    blocks: u64,
    depth: usize,
    write: bool,
) -> anyhow::Result<Measured> {
    timed(blocks, depth, |i| async move {
        if write {
            let bytes = data[(i % PATTERNS) as usize].clone();
            c.write(&layout(), 1, i * BLOCK as u64, bytes).await?;
        } else {
            let data = c.read(&layout(), 1, i * BLOCK as u64, BLOCK as u64).await?;
            anyhow::ensure!(
                data.len() == BLOCK && data[0] == (i % PATTERNS) as u8,
                "block {i} read back wrong"
            );
        }
        Ok(())
    })
    .await
}

/// The same blocks as a sequential write, through the storage-free relay.
async fn relayed(
    relay: &RelayChain,
    data: &[Bytes],
    blocks: u64,
    depth: usize,
) -> anyhow::Result<Measured> {
    timed(blocks, depth, |i| {
        relay.send(data[(i % PATTERNS) as usize].clone())
    })
    .await
}

/// Runs `op` for blocks `0..blocks`, `depth` at a time, and measures the
/// rate and this process's CPU use meanwhile.
async fn timed<F, Fut>(blocks: u64, depth: usize, op: F) -> anyhow::Result<Measured>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::stream::{self, StreamExt, TryStreamExt};
    let t = Instant::now();
    let (cpu, switches) = process_cpu();
    stream::iter(0..blocks)
        .map(op)
        .buffer_unordered(depth.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let wall = t.elapsed().as_secs_f64();
    let (cpu_after, switches_after) = process_cpu();
    let cpu = (cpu_after - cpu).as_secs_f64();
    Ok(Measured {
        mib_per_sec: blocks as f64 / wall,
        cpu: ChainCpu {
            switches_per_mib: (switches_after - switches) as f64 / blocks as f64,
            ms_per_mib: cpu * 1000.0 / blocks as f64,
            busy: cpu / (wall * cpus()),
        },
    })
}
