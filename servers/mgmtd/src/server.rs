//! The mgmtd RPC service: every method of [`r3fs_wire::mgmt`] on a router.

use r3fs_net::Router;
use r3fs_wire::mgmt::*;
use r3fs_wire::ErrorBody;

use crate::{Mgmtd, MgmtdError};

/// Registers every mgmtd method on `router`, served by `mgmtd`.
pub fn register(router: &mut Router, mgmtd: Mgmtd) {
    macro_rules! handle {
        ($method:ty, |$m:ident, $r:ident| $call:expr) => {{
            let mgmtd = mgmtd.clone();
            router.register::<$method, _, _>(move |$r, _ctx| {
                let $m = mgmtd.clone();
                async move { answer($call.await) }
            });
        }};
    }
    handle!(GetPrimary, |m, _r| m.get_primary());
    handle!(RegisterNode, |m, r| m.register_node(r));
    handle!(Heartbeat, |m, r| m.heartbeat(r));
    handle!(GetRoutingInfo, |m, r| m.routing_info(r));
    handle!(CreateChainTable, |m, r| m.create_chain_table(r));
    handle!(OfflineTarget, |m, r| m.offline_target(r));
    handle!(UnregisterNode, |m, r| m.unregister_node(r));
    handle!(ExtendSession, |m, r| m.extend_session(r));
    handle!(ListSessions, |m, _r| m.list_sessions());
    handle!(CloseSession, |m, r| m.close_session(r));
}

fn answer<T>(result: Result<T, MgmtdError>) -> Result<T, ErrorBody> {
    result.map_err(|e| {
        if matches!(e, MgmtdError::Kv(_) | MgmtdError::Corrupt { .. }) {
            tracing::error!(error = %e, "mgmtd call failed");
        }
        e.to_error_body()
    })
}
