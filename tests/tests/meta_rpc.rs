//! The meta service over real RPC on loopback: two servers on one engine,
//! races between clients, errnos reaching the client, and failover.

use std::collections::HashSet;
use std::net::SocketAddr;

use r3fs_client::{MetaClient, MetaClientConfig, MetaClientError};
use r3fs_tests::MetaCluster;
use r3fs_wire::meta::*;

fn root() -> User {
    User::root()
}

fn create_req(parent: InodeId, name: &str) -> CreateRequest {
    CreateRequest {
        user: root(),
        parent,
        name: name.into(),
        perm: 0o644,
        exclusive: true,
        flags: OpenFlags::default(),
        client: 0,
    }
}

fn rename_req(parent: InodeId, name: &str, new_parent: InodeId, new_name: &str) -> RenameRequest {
    RenameRequest {
        user: root(),
        parent,
        name: name.into(),
        new_parent,
        new_name: new_name.into(),
        flags: RenameFlags::default(),
    }
}

#[track_caller]
fn check_errno<T: std::fmt::Debug>(r: Result<T, MetaClientError>, errno: i32) {
    match r {
        Err(e) => assert_eq!(e.errno(), errno, "expected errno {errno}, got {e}"),
        Ok(v) => panic!("expected errno {errno}, got Ok({v:?})"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meta_servers_on_one_engine_serve_one_namespace() {
    let cluster = MetaCluster::start(2).await;
    let (a, b) = (cluster.client_of(0), cluster.client_of(1));
    let made = a.create(create_req(ROOT_INODE, "f")).await.unwrap();
    assert_eq!(
        b.lookup(&root(), ROOT_INODE, b"f").await.unwrap().inode,
        made.attr.inode
    );
    let d = b.mkdir(&root(), ROOT_INODE, b"d", 0o755).await.unwrap();
    b.rename(rename_req(ROOT_INODE, "f", d.inode, "g"))
        .await
        .unwrap();
    check_errno(a.lookup(&root(), ROOT_INODE, b"f").await, libc::ENOENT);
    assert_eq!(
        a.lookup(&root(), d.inode, b"g").await.unwrap().inode,
        made.attr.inode
    );
    // Both servers allocate inode ids; they never collide.
    let mut ids = HashSet::new();
    for i in 0..50 {
        let c = if i % 2 == 0 { &a } else { &b };
        let attr = c
            .create(create_req(d.inode, &format!("n{i}")))
            .await
            .unwrap()
            .attr;
        assert!(
            ids.insert(attr.inode),
            "inode {} handed out twice",
            attr.inode
        );
    }
    assert_eq!(
        a.readdir_all(&root(), d.inode, false).await.unwrap().len(),
        51
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creates_of_one_name_through_two_servers_have_one_winner() {
    let cluster = MetaCluster::start(2).await;
    let clients: Vec<MetaClient> = (0..8).map(|i| cluster.client_of(i % 2)).collect();
    for round in 0..15 {
        let name = format!("race{round}");
        let mut tasks = Vec::new();
        for c in &clients {
            let c = c.clone();
            let name = name.clone();
            tasks.push(tokio::spawn(async move {
                c.create(create_req(ROOT_INODE, &name)).await
            }));
        }
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(e) => assert_eq!(e.errno(), libc::EEXIST, "{e}"),
            }
        }
        assert_eq!(wins, 1, "round {round}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_renames_that_would_form_a_cycle_leave_a_tree() {
    let cluster = MetaCluster::start(2).await;
    let (x, y) = (cluster.client_of(0), cluster.client_of(1));
    for round in 0..15 {
        let top = x
            .mkdir(&root(), ROOT_INODE, format!("t{round}").as_bytes(), 0o755)
            .await
            .unwrap()
            .inode;
        let a = x.mkdir(&root(), top, b"a", 0o755).await.unwrap().inode;
        let b = x.mkdir(&root(), top, b"b", 0o755).await.unwrap().inode;
        let (r1, r2) = tokio::join!(
            x.rename(rename_req(top, "a", b, "a")),
            y.rename(rename_req(top, "b", a, "b"))
        );
        assert!(
            r1.is_ok() != r2.is_ok(),
            "round {round}: exactly one move succeeds: {r1:?} {r2:?}"
        );
        for e in [r1, r2].into_iter().filter_map(Result::err) {
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
        }
        for dir in [a, b] {
            let mut at = dir;
            for _ in 0..8 {
                if at == ROOT_INODE {
                    break;
                }
                at = x.lookup(&root(), at, b"..").await.unwrap().inode;
            }
            assert_eq!(at, ROOT_INODE, "round {round}: {dir} cut off from the root");
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_during_create_and_unlink_churn_lists_stable_entries_once() {
    let cluster = MetaCluster::start(2).await;
    let setup = cluster.client();
    let dir = setup
        .mkdir(&root(), ROOT_INODE, b"churn", 0o755)
        .await
        .unwrap()
        .inode;
    let stable: Vec<String> = (0..300).map(|i| format!("m{i:04}")).collect();
    for n in &stable {
        setup.create(create_req(dir, n)).await.unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut churners = Vec::new();
    for w in 0..3 {
        let c = cluster.client_of(w % 2);
        let stop = stop.clone();
        churners.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Names sort before, among and after the stable ones.
                let name = format!("{}w{w}-{i}", ["a", "m", "z"][(i % 3) as usize]);
                c.create(create_req(dir, &name)).await.unwrap();
                c.unlink(&root(), dir, name.as_bytes()).await.unwrap();
                i += 1;
            }
            i
        }));
    }
    let reader = cluster.client_of(1);
    for _ in 0..5 {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let req = ReadDirRequest {
                user: root(),
                inode: dir,
                after: after.clone(),
                limit: 37,
                plus: false,
            };
            let page = reader.readdir(req).await.unwrap();
            after = page.entries.last().map(|e| e.name.clone());
            seen.extend(
                page.entries
                    .into_iter()
                    .map(|e| String::from_utf8(e.name).unwrap()),
            );
            if !page.more {
                break;
            }
        }
        for n in &stable {
            assert_eq!(
                seen.iter().filter(|s| *s == n).count(),
                1,
                "{n} not listed exactly once"
            );
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "an entry was listed twice");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut churned = 0;
    for c in churners {
        churned += c.await.unwrap();
    }
    assert!(churned > 0, "the churners ran");
    assert_eq!(
        setup.readdir_all(&root(), dir, false).await.unwrap().len(),
        stable.len()
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_mkdir_and_rmdir_keep_the_parent_link_count_exact() {
    let cluster = MetaCluster::start(2).await;
    let setup = cluster.client();
    let dir = setup
        .mkdir(&root(), ROOT_INODE, b"d", 0o755)
        .await
        .unwrap()
        .inode;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let c = cluster.client_of(w % 2);
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let name = format!("w{w}-{i}");
                c.mkdir(&root(), dir, name.as_bytes(), 0o755).await.unwrap();
                if i % 2 == 1 {
                    c.rmdir(&root(), dir, name.as_bytes()).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let kept = setup.readdir_all(&root(), dir, true).await.unwrap();
    assert_eq!(kept.len(), 4 * 13);
    assert_eq!(setup.getattr(dir).await.unwrap().nlink, 2 + 4 * 13);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_errnos_reach_the_client() {
    let cluster = MetaCluster::start(1).await;
    let c = cluster.client();
    let d = c
        .mkdir(&root(), ROOT_INODE, b"d", 0o755)
        .await
        .unwrap()
        .inode;
    c.create(create_req(d, "f")).await.unwrap();
    check_errno(c.lookup(&root(), ROOT_INODE, b"nope").await, libc::ENOENT);
    check_errno(c.create(create_req(d, "f")).await, libc::EEXIST);
    check_errno(c.rmdir(&root(), ROOT_INODE, b"d").await, libc::ENOTEMPTY);
    check_errno(
        c.create(create_req(d, &"n".repeat(300))).await,
        libc::ENAMETOOLONG,
    );
    check_errno(
        c.rename(rename_req(ROOT_INODE, "d", d, "inside")).await,
        libc::EINVAL,
    );
    let alice = User {
        uid: 1000,
        gid: 1000,
        groups: vec![],
    };
    check_errno(c.mkdir(&alice, ROOT_INODE, b"x", 0o755).await, libc::EACCES);
    check_errno(c.resolve(&root(), "/d/f/deeper", true).await, libc::ENOTDIR);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_resolve_through_symlinks_and_loops_give_eloop() {
    let cluster = MetaCluster::start(1).await;
    let c = cluster.client();
    let d = c.mkdir(&root(), ROOT_INODE, b"d", 0o755).await.unwrap();
    let f = c.create(create_req(d.inode, "f")).await.unwrap().attr;
    c.symlink(&root(), ROOT_INODE, b"abs", b"/d").await.unwrap();
    c.symlink(&root(), d.inode, b"rel", b"f").await.unwrap();
    c.symlink(&root(), ROOT_INODE, b"loop1", b"loop2")
        .await
        .unwrap();
    c.symlink(&root(), ROOT_INODE, b"loop2", b"loop1")
        .await
        .unwrap();
    assert_eq!(
        c.resolve(&root(), "/abs/f", true).await.unwrap().inode,
        f.inode
    );
    assert_eq!(
        c.resolve(&root(), "/abs/rel", true).await.unwrap().inode,
        f.inode
    );
    assert_eq!(
        c.resolve(&root(), "/abs/rel", false)
            .await
            .unwrap()
            .file_type,
        FileType::Symlink
    );
    check_errno(c.resolve(&root(), "/loop1", true).await, libc::ELOOP);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_meta_server_is_skipped() {
    let cluster = MetaCluster::start(1).await;
    // A port nothing listens on: bind, note the port, close.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = MetaClient::new(MetaClientConfig::new(vec![dead, cluster.addrs[0]])).unwrap();
    for i in 0..6 {
        c.mkdir(&root(), ROOT_INODE, format!("d{i}").as_bytes(), 0o755)
            .await
            .unwrap();
    }
    let only_dead = MetaClient::new(MetaClientConfig::new(vec![dead])).unwrap();
    let err = only_dead.getattr(ROOT_INODE).await.unwrap_err();
    assert!(matches!(err, MetaClientError::NoServer { .. }), "{err}");
    assert_eq!(err.errno(), libc::EIO);
    cluster.shutdown().await;
}

fn lock_req(
    inode: InodeId,
    (client, owner): (u64, u64),
    lock_type: LockType,
    start: u64,
    end: u64,
) -> SetLockRequest {
    SetLockRequest {
        inode,
        client,
        owner,
        pid: owner as u32,
        kind: LockKind::Posix,
        lock_type,
        start,
        end,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_write_locks_through_two_servers_have_one_winner_per_round() {
    let cluster = MetaCluster::start(2).await;
    let setup = cluster.client();
    let ino = setup
        .create(create_req(ROOT_INODE, "locked"))
        .await
        .unwrap()
        .attr
        .inode;
    let (x, y) = (cluster.client_of(0), cluster.client_of(1));
    let (cx, cy) = (x.client_id(), y.client_id());
    for round in 0..40u64 {
        // Same or partly overlapping ranges; the loser sees the winner's lock.
        let shift = [0, 50, 99][round as usize % 3];
        let (rx, ry) = tokio::join!(
            x.set_lock(lock_req(ino, (cx, round), LockType::Write, 100, 199)),
            y.set_lock(lock_req(
                ino,
                (cy, round),
                LockType::Write,
                100 + shift,
                299
            ))
        );
        assert!(
            rx.is_ok() != ry.is_ok(),
            "round {round}: exactly one lock is granted: {rx:?} {ry:?}"
        );
        for e in [&rx, &ry].into_iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(e.errno(), libc::EAGAIN, "{e}");
        }
        let (winner, client, other) = if rx.is_ok() {
            (&x, cx, cy)
        } else {
            (&y, cy, cx)
        };
        let seen = setup
            .get_lock(GetLockRequest {
                inode: ino,
                client: other,
                owner: round,
                kind: LockKind::Posix,
                lock_type: LockType::Read,
                start: 199,
                end: 199,
            })
            .await
            .unwrap()
            .expect("the winner's lock is visible through any server");
        assert_eq!(
            (seen.client, seen.owner, seen.lock_type),
            (client, round, LockType::Write)
        );
        winner
            .set_lock(lock_req(
                ino,
                (client, round),
                LockType::Unlock,
                0,
                LOCK_END_EOF,
            ))
            .await
            .unwrap();
    }
    // A clean unmount drops the lease and every lock.
    x.set_lock(lock_req(ino, (cx, 0), LockType::Read, 0, 0))
        .await
        .unwrap();
    x.drop_client_locks(cx).await.unwrap();
    y.set_lock(lock_req(ino, (cy, 0), LockType::Write, 0, LOCK_END_EOF))
        .await
        .unwrap();
    cluster.shutdown().await;
}

/// The model of POSIX byte-range locks: each owner's lock type per position.
/// Positions 0..MODEL_TAIL are single bytes; position MODEL_TAIL stands for
/// every byte from there to the end (only ranges to EOF reach it).
mod posix_model {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    /// Ranges start below this and have finite ends below MODEL_TAIL.
    const START_MAX: u64 = 12;
    const LEN_MAX: u64 = 6;
    const MODEL_TAIL: usize = 20;
    const POSITIONS: usize = MODEL_TAIL + 1;
    /// Three owners: two of one client, one of another.
    const OWNERS: [(u64, u64); 3] = [(0xc1, 1), (0xc1, 2), (0xc2, 1)];

    #[derive(Debug, Clone, Copy)]
    enum End {
        Len(u64),
        Eof,
        /// Ends before it starts: EINVAL.
        Backwards,
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Set(usize, LockType, u64, End),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        let ty = prop_oneof![
            Just(LockType::Read),
            Just(LockType::Write),
            Just(LockType::Unlock)
        ];
        let end = prop_oneof![
            6 => (0..LEN_MAX).prop_map(End::Len),
            2 => Just(End::Eof),
            1 => Just(End::Backwards),
        ];
        prop_oneof![
            10 => (0..OWNERS.len(), ty, 0..START_MAX, end).prop_map(|(o, t, s, e)| Op::Set(o, t, s, e)),
            1 => (0..OWNERS.len()).prop_map(Op::Release),
        ]
    }

    type Held = [Option<bool>; POSITIONS];

    fn span(start: u64, end: u64) -> std::ops::RangeInclusive<usize> {
        let last = if end == LOCK_END_EOF {
            MODEL_TAIL
        } else {
            end as usize
        };
        start as usize..=last
    }

    /// What the model answers for one step; `None` means EINVAL.
    fn apply(model: &mut [Held; 3], op: Op) -> Option<Result<(), ()>> {
        let (who, ty, start, end) = match op {
            Op::Release(who) => {
                model[who] = [None; POSITIONS];
                return Some(Ok(()));
            }
            Op::Set(who, ty, start, End::Len(len)) => (who, ty, start, start + len),
            Op::Set(who, ty, start, End::Eof) => (who, ty, start, LOCK_END_EOF),
            Op::Set(_, _, start, End::Backwards) if start > 0 => return None,
            // From 0, "one before the start" wraps to a lock to EOF.
            Op::Set(who, ty, _, End::Backwards) => (who, ty, 0, LOCK_END_EOF),
        };
        let want = match ty {
            LockType::Read => Some(false),
            LockType::Write => Some(true),
            LockType::Unlock => None,
        };
        if let Some(write) = want {
            let blocked = (0..3)
                .filter(|&o| o != who)
                .any(|o| span(start, end).any(|p| model[o][p].is_some_and(|held| held || write)));
            if blocked {
                return Some(Err(()));
            }
        }
        for p in span(start, end) {
            model[who][p] = want;
        }
        Some(Ok(()))
    }

    /// The model's F_GETLK answer for a write probe of position `at` by `who`:
    /// each other owner's maximal same-type run there, lowest start first.
    fn getlk(model: &[Held; 3], who: usize, at: usize) -> Option<LockInfo> {
        (0..3)
            .filter(|&o| o != who)
            .filter_map(|o| {
                let write = model[o][at]?;
                let mut first = at;
                while first > 0 && model[o][first - 1] == Some(write) {
                    first -= 1;
                }
                let mut last = at;
                while last < MODEL_TAIL && model[o][last + 1] == Some(write) {
                    last += 1;
                }
                let end = if last == MODEL_TAIL {
                    LOCK_END_EOF
                } else {
                    last as u64
                };
                let (client, owner) = OWNERS[o];
                Some(LockInfo {
                    kind: LockKind::Posix,
                    lock_type: if write {
                        LockType::Write
                    } else {
                        LockType::Read
                    },
                    start: first as u64,
                    end,
                    client,
                    owner,
                    pid: owner as u32,
                })
            })
            .min_by_key(|l| (l.start, l.client, l.owner))
    }

    fn request(ino: InodeId, op: Op) -> Option<SetLockRequest> {
        let Op::Set(who, ty, start, end) = op else {
            return None;
        };
        let end = match end {
            End::Len(len) => start + len,
            End::Eof => LOCK_END_EOF,
            End::Backwards => start.wrapping_sub(1),
        };
        Some(lock_req(ino, OWNERS[who], ty, start, end))
    }

    async fn run_case(
        clients: &[MetaClient; 2],
        ino: InodeId,
        ops: &[Op],
    ) -> Result<(), TestCaseError> {
        for &(client, _) in &OWNERS {
            clients[0].renew_lock_lease(client).await.unwrap();
        }
        let mut model: [Held; 3] = [[None; POSITIONS]; 3];
        for (step, &op) in ops.iter().enumerate() {
            let expect = apply(&mut model, op);
            let via = &clients[step % 2];
            let got = match (request(ino, op), op) {
                (Some(req), _) => via.set_lock(req).await,
                (None, Op::Release(who)) => {
                    via.release_locks(ReleaseLocksRequest {
                        inode: ino,
                        client: OWNERS[who].0,
                        owner: OWNERS[who].1,
                        kind: LockKind::Posix,
                    })
                    .await
                }
                (None, Op::Set(..)) => unreachable!("every Set makes a request"),
            };
            let got = got.map_err(|e| e.errno());
            let want = match expect {
                None => Err(libc::EINVAL),
                Some(Ok(())) => Ok(()),
                Some(Err(())) => Err(libc::EAGAIN),
            };
            prop_assert_eq!(got, want, "step {} {:?}", step, op);
            // Every owner's view of every position, probed concurrently.
            let mut probes = tokio::task::JoinSet::new();
            for who in 0..3 {
                for at in 0..POSITIONS {
                    let c = clients[(who + at) % 2].clone();
                    let (start, end) = if at == MODEL_TAIL {
                        (1 << 40, LOCK_END_EOF)
                    } else {
                        (at as u64, at as u64)
                    };
                    let req = GetLockRequest {
                        inode: ino,
                        client: OWNERS[who].0,
                        owner: OWNERS[who].1,
                        kind: LockKind::Posix,
                        lock_type: LockType::Write,
                        start,
                        end,
                    };
                    probes.spawn(async move { (who, at, c.get_lock(req).await.unwrap()) });
                }
            }
            while let Some(probe) = probes.join_next().await {
                let (who, at, got) = probe.unwrap();
                let got = got.map(|l| LockInfo {
                    // A probe beyond the tail sees the tail position.
                    start: l.start.min(MODEL_TAIL as u64),
                    ..l
                });
                prop_assert_eq!(
                    got,
                    getlk(&model, who, at),
                    "step {} {:?}: owner {} at {}",
                    step,
                    op,
                    who,
                    at
                );
            }
        }
        Ok(())
    }

    #[test]
    fn random_posix_lock_sequences_match_the_byte_model() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let cluster = rt.block_on(MetaCluster::start(2));
        let clients = [cluster.client_of(0), cluster.client_of(1)];
        let files = std::sync::atomic::AtomicU64::new(0);
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&proptest::collection::vec(op(), 1..24), |ops| {
            let n = files.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(async {
                let ino = clients[0]
                    .create(create_req(ROOT_INODE, &format!("case{n}")))
                    .await
                    .unwrap()
                    .attr
                    .inode;
                run_case(&clients, ino, &ops).await
            })
        });
        rt.block_on(cluster.shutdown());
        if let Err(e) = result {
            panic!("{e}");
        }
    }
}
