//! The conformance suite against a FoundationDB cluster, when one is configured.
#![cfg(feature = "fdb")]

use std::sync::Arc;

use r3fs_kv::fdb::FdbEngine;
use r3fs_kv::{conformance, KvEngine};

/// The cluster file to test against; the test is skipped without it.
const CLUSTER_FILE_ENV: &str = "FDB_CLUSTER_FILE";

#[test]
fn conformance_suite_passes_against_foundationdb() {
    let Ok(cluster_file) = std::env::var(CLUSTER_FILE_ENV) else {
        println!("skipping FoundationDB conformance: {CLUSTER_FILE_ENV} is not set");
        return;
    };
    let engine: Arc<dyn KvEngine> =
        Arc::new(FdbEngine::open(Some(&cluster_file)).expect("connect to FoundationDB"));
    // Every check wants an empty keyspace: clear all user keys (below 0xff).
    let factory = move || {
        let mut txn = engine.begin().expect("begin");
        txn.clear_range(b"", b"\xff").expect("clear user keyspace");
        txn.commit().expect("commit clear");
        Arc::clone(&engine)
    };
    conformance::run_all(&factory);
}
