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
