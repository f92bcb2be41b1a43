//! The chain state machine: from a chain and its targets' reported local
//! states, the next public states, the next order and the next chain version.
//!
//! Pure: no I/O, no clock, no KV store, no async. mgmtd reads heartbeats,
//! calls [`next_chain`], asserts [`check_invariants`] and persists the result;
//! none of that happens here.
//!
//! # Transition table
//!
//! One step looks at every target once. "At start" means in the chain passed
//! in; "after" means among the states this step produces.
//!
//! | public  | local            | next public                                                        |
//! |---------|------------------|--------------------------------------------------------------------|
//! | SERVING | UpToDate         | SERVING                                                            |
//! | SERVING | Online           | WAITING (restarted, may have missed writes); LASTSRV if chosen (1) |
//! | SERVING | Offline          | OFFLINE; LASTSRV if chosen (1)                                     |
//! | LASTSRV | UpToDate, Online | SERVING (it holds the newest data)                                 |
//! | LASTSRV | Offline          | LASTSRV if chosen (1), else OFFLINE (2)                            |
//! | SYNCING | UpToDate         | SERVING if some target is SERVING at start (the source), else WAITING |
//! | SYNCING | Online           | SYNCING if some target is SERVING after (3), else WAITING          |
//! | SYNCING | Offline          | OFFLINE                                                            |
//! | WAITING | UpToDate, Online | SYNCING if chosen (4), else WAITING — never SERVING or LASTSRV     |
//! | WAITING | Offline          | OFFLINE                                                            |
//! | OFFLINE | UpToDate, Online | WAITING — never SERVING                                            |
//! | OFFLINE | Offline          | OFFLINE                                                            |
//!
//! 1. LASTSRV choice. If no target is SERVING after this step, exactly one of
//!    the targets that were SERVING (or LASTSRV) at start and are leaving
//!    becomes LASTSRV: the first in chain order that is still alive (local
//!    Online), else the first in chain order. Every SERVING target holds every
//!    acknowledged write, so any of them is a safe restart point; an alive one
//!    comes back as SERVING in the next step. Without this, a chain whose
//!    only SERVING target restarts (reporting Online before mgmtd saw it
//!    Offline) would be left with no SERVING or LASTSRV target forever.
//! 2. A LASTSRV target never coexists with a SERVING one in a valid chain,
//!    so "else OFFLINE" only repairs invalid input.
//! 3. Only the first such target in chain order; the others (invalid input
//!    with two SYNCING targets) fall back to WAITING.
//! 4. Only the first WAITING target in chain order whose local state is not
//!    Offline, and only if after this step some target is SERVING and none is
//!    SYNCING.
//!
//! Then targets are ordered SERVING, LASTSRV, SYNCING, WAITING, OFFLINE
//! ([`PublicState`]'s `Ord`), keeping their previous relative order within
//! one state. The version goes up by exactly one iff any state or the order
//! changed.
//!
//! # No automatic recovery without SERVING or LASTSRV
//!
//! A chain with no SERVING and no LASTSRV target (its LASTSRV's disk died, or
//! an admin set the states) stays that way: every remaining replica may be
//! stale and none is promoted automatically. An admin must pick one. The one
//! exception is [`new_chain`]: an empty chain, where every replica trivially
//! holds every write, starts with all targets SERVING.
//!
//! # Contract with storage nodes
//!
//! The machine does not trust UpToDate from a WAITING or OFFLINE target (it
//! may be stale or lying). It does trust UpToDate from a SYNCING target as
//! "the sync into me finished", so the caller must pass Online for a target
//! whose UpToDate report predates its promotion to SYNCING (a node resets its
//! report to Online when it learns it is SYNCING, and reports UpToDate for a
//! SERVING target once it learns it is SERVING).
//!
//! # Limits
//!
//! Versions saturate at `u64::MAX` (unreachable: one bump per change).

use std::collections::HashSet;

use r3fs_wire::mgmt::{Chain, ChainId, ChainTarget, LocalState, PublicState, TargetId};

/// The version of a chain made by [`new_chain`].
pub const CHAIN_VERSION_INITIAL: u64 = 1;

/// A fresh chain over empty targets: all SERVING, version
/// [`CHAIN_VERSION_INITIAL`]. Duplicate ids are kept as given;
/// [`check_invariants`] reports them.
pub fn new_chain(id: ChainId, targets: &[TargetId]) -> Chain {
    Chain {
        id,
        version: CHAIN_VERSION_INITIAL,
        targets: targets
            .iter()
            .map(|&target| ChainTarget {
                target,
                state: PublicState::Serving,
            })
            .collect(),
    }
}

/// What one (public, local) pair of the table leads to; the conditions named
/// in the table are resolved by [`next_chain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Unconditionally this state.
    To(PublicState),
    /// Leaving SERVING: LASTSRV if chosen, else this state.
    LeaveServing(PublicState),
    /// LASTSRV still down: LASTSRV if chosen, else OFFLINE.
    StayLastSrv,
    /// SYNCING reports done: SERVING if some target was SERVING at start.
    FinishSync,
    /// SYNCING still copying: SYNCING while a source is SERVING.
    ContinueSync,
    /// WAITING and alive: SYNCING if it is its turn.
    AwaitSync,
}

/// The transition table of the module doc, one arm per row.
const fn rule(public: PublicState, local: LocalState) -> Rule {
    use LocalState as L;
    use PublicState as P;
    match (public, local) {
        (P::Serving, L::UpToDate) => Rule::To(P::Serving),
        (P::Serving, L::Online) => Rule::LeaveServing(P::Waiting),
        (P::Serving, L::Offline) => Rule::LeaveServing(P::Offline),
        (P::LastSrv, L::UpToDate | L::Online) => Rule::To(P::Serving),
        (P::LastSrv, L::Offline) => Rule::StayLastSrv,
        (P::Syncing, L::UpToDate) => Rule::FinishSync,
        (P::Syncing, L::Online) => Rule::ContinueSync,
        (P::Syncing, L::Offline) => Rule::To(P::Offline),
        (P::Waiting, L::UpToDate | L::Online) => Rule::AwaitSync,
        (P::Waiting, L::Offline) => Rule::To(P::Offline),
        (P::Offline, L::UpToDate | L::Online) => Rule::To(P::Waiting),
        (P::Offline, L::Offline) => Rule::To(P::Offline),
    }
}

/// One step of the state machine. `local` gives every target's reported
/// local state (the caller decides what a target without a recent heartbeat
/// reports; normally Offline). Returns the chain unchanged, version included,
/// when nothing changes, and also when the chain has duplicate target ids
/// (that is corrupt state for [`check_invariants`] to report, not input to
/// guess about).
pub fn next_chain(chain: &Chain, local: impl Fn(TargetId) -> LocalState) -> Chain {
    if has_duplicate_targets(chain) {
        return chain.clone();
    }
    let serving_at_start = chain
        .targets
        .iter()
        .any(|t| t.state == PublicState::Serving);
    let rules: Vec<(Rule, LocalState)> = chain
        .targets
        .iter()
        .map(|t| {
            let l = local(t.target);
            (rule(t.state, l), l)
        })
        .collect();

    // Only `To(Serving)` and `FinishSync` can produce SERVING.
    let serving_after = rules.iter().any(|(r, _)| match r {
        Rule::To(s) => *s == PublicState::Serving,
        Rule::FinishSync => serving_at_start,
        _ => false,
    });
    let is_lastsrv_candidate = |r: &Rule| matches!(r, Rule::LeaveServing(_) | Rule::StayLastSrv);
    let lastsrv = if serving_after {
        None
    } else {
        rules
            .iter()
            .position(|(r, l)| is_lastsrv_candidate(r) && *l == LocalState::Online)
            .or_else(|| rules.iter().position(|(r, _)| is_lastsrv_candidate(r)))
    };
    let syncing = if serving_after {
        rules.iter().position(|(r, _)| *r == Rule::ContinueSync)
    } else {
        None
    };
    let promoted = if serving_after && syncing.is_none() {
        rules.iter().position(|(r, _)| *r == Rule::AwaitSync)
    } else {
        None
    };

    let mut targets: Vec<ChainTarget> = chain
        .targets
        .iter()
        .zip(&rules)
        .enumerate()
        .map(|(i, (t, (r, _)))| {
            let state = match *r {
                Rule::To(s) => s,
                Rule::LeaveServing(_) | Rule::StayLastSrv if lastsrv == Some(i) => {
                    PublicState::LastSrv
                }
                Rule::LeaveServing(s) => s,
                Rule::StayLastSrv => PublicState::Offline,
                Rule::FinishSync if serving_at_start => PublicState::Serving,
                Rule::ContinueSync | Rule::AwaitSync if syncing == Some(i) => PublicState::Syncing,
                Rule::AwaitSync if promoted == Some(i) => PublicState::Syncing,
                Rule::FinishSync | Rule::ContinueSync | Rule::AwaitSync => PublicState::Waiting,
            };
            ChainTarget {
                target: t.target,
                state,
            }
        })
        .collect();
    // Stable: keeps the previous relative order within one state.
    targets.sort_by_key(|t| t.state);

    if targets == chain.targets {
        return chain.clone();
    }
    Chain {
        id: chain.id,
        version: chain.version.saturating_add(1),
        targets,
    }
}

fn has_duplicate_targets(chain: &Chain) -> bool {
    let mut seen = HashSet::with_capacity(chain.targets.len());
    !chain.targets.iter().all(|t| seen.insert(t.target))
}

/// Checks what every chain mgmtd publishes must satisfy: targets ordered by
/// state, no duplicate target ids, at most one SYNCING and at most one
/// LASTSRV target, no LASTSRV next to a SERVING target, and a SYNCING target
/// only while some target is SERVING (its source).
pub fn check_invariants(chain: &Chain) -> Result<(), String> {
    let id = chain.id;
    if let Some(w) = chain.targets.windows(2).find(|w| w[0].state > w[1].state) {
        return Err(format!(
            "chain {id}: target {} ({:?}) is ordered before target {} ({:?})",
            w[0].target, w[0].state, w[1].target, w[1].state
        ));
    }
    if has_duplicate_targets(chain) {
        return Err(format!("chain {id}: duplicate target ids"));
    }
    let count = |s: PublicState| chain.targets.iter().filter(|t| t.state == s).count();
    let serving = count(PublicState::Serving);
    let lastsrv = count(PublicState::LastSrv);
    let syncing = count(PublicState::Syncing);
    if syncing > 1 {
        return Err(format!("chain {id}: {syncing} SYNCING targets"));
    }
    if lastsrv > 1 {
        return Err(format!("chain {id}: {lastsrv} LASTSRV targets"));
    }
    if lastsrv > 0 && serving > 0 {
        return Err(format!("chain {id}: LASTSRV next to SERVING"));
    }
    if syncing > 0 && serving == 0 {
        return Err(format!("chain {id}: SYNCING without a SERVING source"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_chain_is_all_serving_at_initial_version() {
        let c = new_chain(3, &[10, 11]);
        assert_eq!(c.version, CHAIN_VERSION_INITIAL);
        assert!(c.targets.iter().all(|t| t.state == PublicState::Serving));
        assert_eq!(check_invariants(&c), Ok(()));
    }

    #[test]
    fn duplicate_targets_are_returned_unchanged_and_reported() {
        let c = new_chain(1, &[5, 5]);
        assert_eq!(next_chain(&c, |_| LocalState::Offline), c);
        assert!(check_invariants(&c).is_err());
    }

    #[test]
    fn empty_chain_is_unchanged_and_valid() {
        let c = new_chain(1, &[]);
        assert_eq!(next_chain(&c, |_| LocalState::Online), c);
        assert_eq!(check_invariants(&c), Ok(()));
    }
}
