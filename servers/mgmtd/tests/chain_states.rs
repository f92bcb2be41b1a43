//! The chain state machine, as a table of one-step cases and as a property
//! test against a small model of which replicas hold every acknowledged write.
//!
//! Notation. A chain before a step is its states in order, e.g. `"S S O"`,
//! with target ids 1, 2, 3 in that order. Locals are positional: `U`
//! UpToDate, `N` Online, `O` Offline. An expected chain names each target:
//! `"S1 S3 O2"`. Public states: `S` SERVING, `L` LASTSRV, `Y` SYNCING,
//! `W` WAITING, `O` OFFLINE.

use std::collections::HashMap;

use proptest::prelude::*;
use r3fs_mgmtd::chain::{check_invariants, new_chain, next_chain};
use r3fs_wire::mgmt::{Chain, ChainTarget, LocalState, PublicState, TargetId};

const VERSION_BEFORE: u64 = 7;
/// Steps one event may take to settle; the longest path seen is
/// SERVING -> LASTSRV -> SERVING, then a WAITING target -> SYNCING.
const SETTLE_STEPS_MAX: usize = 6;
const CHAIN_TARGETS_MAX: usize = 5;
const EVENTS_MAX: usize = 60;
const PROPTEST_CASES: u32 = 1024;

fn public(c: char) -> PublicState {
    match c {
        'S' => PublicState::Serving,
        'L' => PublicState::LastSrv,
        'Y' => PublicState::Syncing,
        'W' => PublicState::Waiting,
        'O' => PublicState::Offline,
        _ => panic!("bad public state {c:?}"),
    }
}

fn local(c: char) -> LocalState {
    match c {
        'U' => LocalState::UpToDate,
        'N' => LocalState::Online,
        'O' => LocalState::Offline,
        _ => panic!("bad local state {c:?}"),
    }
}

fn letter(s: PublicState) -> char {
    match s {
        PublicState::Serving => 'S',
        PublicState::LastSrv => 'L',
        PublicState::Syncing => 'Y',
        PublicState::Waiting => 'W',
        PublicState::Offline => 'O',
    }
}

/// `"S S O"` -> targets 1, 2, 3.
fn chain_of_states(states: &str) -> Chain {
    Chain {
        id: 1,
        version: VERSION_BEFORE,
        targets: states
            .split_whitespace()
            .zip(1..)
            .map(|(s, target)| ChainTarget {
                target,
                state: public(s.chars().next().unwrap()),
            })
            .collect(),
    }
}

/// `"S1 S3 O2"` -> those targets in that order.
fn chain_of_named(named: &str) -> Chain {
    Chain {
        id: 1,
        version: VERSION_BEFORE,
        targets: named
            .split_whitespace()
            .map(|t| ChainTarget {
                target: t[1..].parse().unwrap(),
                state: public(t.chars().next().unwrap()),
            })
            .collect(),
    }
}

fn show(chain: &Chain) -> String {
    let targets: Vec<String> = chain
        .targets
        .iter()
        .map(|t| format!("{}{}", letter(t.state), t.target))
        .collect();
    targets.join(" ")
}

/// One step from `before` under `locals` must give `expected`, with the
/// version bumped by one iff `bumped`, and a valid chain.
fn check(before: &str, locals: &str, expected: &str, bumped: bool) {
    let chain = chain_of_states(before);
    let locals: Vec<LocalState> = locals
        .split_whitespace()
        .map(|l| local(l.chars().next().unwrap()))
        .collect();
    assert_eq!(locals.len(), chain.targets.len(), "row {before:?}");
    let next = next_chain(&chain, |t: TargetId| locals[(t - 1) as usize]);
    let case = format!("{before:?} + {locals:?}");
    assert_eq!(show(&next), expected, "{case}");
    assert_eq!(next.version, VERSION_BEFORE + u64::from(bumped), "{case}");
    if !bumped {
        assert_eq!(next, chain, "{case}");
    }
    assert_eq!(check_invariants(&next), Ok(()), "{case}");
}

#[test]
fn serving_stays_while_up_to_date_and_leaves_when_restarted_or_down() {
    check("S S S", "U U U", "S1 S2 S3", false);
    check("S S S", "U N U", "S1 S3 W2", true);
    check("S S S", "U O U", "S1 S3 O2", true);
}

#[test]
fn all_serving_down_at_once_makes_only_the_first_lastsrv() {
    check("S S S", "O O O", "L1 O2 O3", true);
    check("S S W", "O O U", "L1 W3 O2", true);
    check("S S O", "O O O", "L1 O2 O3", true);
    // The SYNCING target loses its source in the same step.
    check("S S Y", "O O N", "L1 W3 O2", true);
}

#[test]
fn last_serving_target_restarting_becomes_lastsrv_then_serving() {
    // Beyond the brief's SERVING + Online -> WAITING: without it a chain
    // whose only SERVING target restarts would have no SERVING or LASTSRV.
    check("S", "N", "L1", true);
    check("L", "N", "S1", true);
    check("S S", "N N", "L1 W2", true);
    // An alive candidate is preferred over an earlier one that is down.
    check("S S", "O N", "L2 O1", true);
}

#[test]
fn lastsrv_serves_again_when_back_and_holds_while_down() {
    check("L O", "U O", "S1 O2", true);
    check("L O", "N N", "S1 W2", true);
    check("L W", "O N", "L1 W2", false);
    check("L", "O", "L1", false);
}

#[test]
fn syncing_serves_after_sync_only_with_a_serving_source() {
    check("S Y", "U U", "S1 S2", true);
    check("S Y", "U N", "S1 Y2", false);
    check("S Y", "U O", "S1 O2", true);
    // The source went down as the sync finished: the copy is complete.
    check("S Y", "O U", "S2 O1", true);
    // The source went down mid-sync: the copy is incomplete.
    check("S Y", "O N", "L1 W2", true);
    // Invalid input, no source at all.
    check("Y", "U", "W1", true);
    check("Y W", "N N", "W1 W2", true);
}

#[test]
fn syncing_slot_freed_this_step_goes_to_the_next_waiting() {
    check("S Y W", "U O N", "S1 Y3 O2", true);
    check("S Y W", "U U U", "S1 S2 Y3", true);
}

#[test]
fn only_the_first_alive_waiting_target_starts_syncing() {
    check("S W W", "U N N", "S1 Y2 W3", true);
    check("S W W", "U O N", "S1 Y3 O2", true);
    check("S Y W", "U N U", "S1 Y2 W3", false);
}

#[test]
fn waiting_or_offline_claiming_up_to_date_is_not_trusted() {
    check("S W", "U U", "S1 Y2", true);
    check("S O", "U U", "S1 W2", true);
    check("L W", "O U", "L1 W2", false);
}

#[test]
fn chain_without_serving_or_lastsrv_is_never_promoted() {
    check("W W", "U U", "W1 W2", false);
    check("O O", "U U", "W1 W2", true);
    check("W O", "N U", "W1 W2", true);
}

#[test]
fn offline_comes_back_as_waiting() {
    check("S O", "U N", "S1 W2", true);
    check("S O", "U O", "S1 O2", false);
}

#[test]
fn reordering_keeps_relative_order_within_a_state() {
    check("S S S S", "U O U O", "S1 S3 O2 O4", true);
    check("S S Y W W O", "O U U N N U", "S2 S3 Y4 W5 W6 O1", true);
    // An unsorted chain gets sorted, and that alone is a change.
    check("W S", "O U", "S2 O1", true);
    check("O S", "O U", "S2 O1", true);
}

#[test]
fn unchanged_chain_keeps_its_version() {
    check("S S Y W O", "U U N N O", "S1 S2 Y3 W4 O5", false);
    check("", "", "", false);
}

#[test]
fn invariants_reject_each_broken_rule() {
    let cases = [
        ("S1 S2 Y3 W4 O5", true),
        ("L1 W2 O3", true),
        ("W1 O2", true),
        ("", true),
        ("W1 S2", false),
        ("S1 S1", false),
        ("S1 Y2 Y3", false),
        ("L1 L2", false),
        ("S1 L2", false),
        ("Y1 W2", false),
    ];
    for (named, valid) in cases {
        let result = check_invariants(&chain_of_named(named));
        assert_eq!(result.is_ok(), valid, "{named:?}: {result:?}");
    }
}

// ---------------------------------------------------------------------------
// Property test: random events against a model of acknowledged writes.

/// The step function under test, so a deliberately wrong one can be run
/// through the same checker.
type Step = fn(&Chain, &dyn Fn(TargetId) -> LocalState) -> Chain;

fn correct_step(chain: &Chain, local: &dyn Fn(TargetId) -> LocalState) -> Chain {
    next_chain(chain, local)
}

#[derive(Debug, Clone, Copy)]
enum Event {
    /// The target's node stops heartbeating (its disk survives).
    Down(usize),
    /// The target's node restarts with its data and reports Online.
    Restart(usize),
    /// The target reports UpToDate: genuine for a SYNCING target (its sync
    /// finished), a false claim for a WAITING or OFFLINE one.
    ReportUpToDate(usize),
    /// A client write, acknowledged iff some target is SERVING.
    Write,
}

struct Model {
    chain: Chain,
    local: HashMap<TargetId, LocalState>,
    /// Whether the target holds every acknowledged write.
    complete: HashMap<TargetId, bool>,
}

impl Model {
    fn new(targets: usize) -> Model {
        let ids: Vec<TargetId> = (1..=targets as TargetId).collect();
        Model {
            chain: new_chain(1, &ids),
            local: ids.iter().map(|&t| (t, LocalState::UpToDate)).collect(),
            // An empty chain: every replica holds every (no) write.
            complete: ids.iter().map(|&t| (t, true)).collect(),
        }
    }

    fn target(&self, i: usize) -> TargetId {
        i as TargetId % self.local.len() as TargetId + 1
    }

    fn apply(&mut self, event: Event, step: Step) -> Result<(), String> {
        match event {
            Event::Down(i) => self.report(i, LocalState::Offline),
            Event::Restart(i) => self.report(i, LocalState::Online),
            Event::ReportUpToDate(i) => self.report(i, LocalState::UpToDate),
            Event::Write => self.write(),
        }
        self.settle(step)
    }

    fn report(&mut self, i: usize, l: LocalState) {
        let t = self.target(i);
        self.local.insert(t, l);
    }

    /// CRAQ acknowledges a write once every SERVING target applied it; the
    /// others miss it.
    fn write(&mut self) {
        let serving = |t| self.state(t) == Some(PublicState::Serving);
        if !self.chain.targets.iter().any(|t| serving(t.target)) {
            return;
        }
        let next: Vec<(TargetId, bool)> = self
            .chain
            .targets
            .iter()
            .map(|t| (t.target, serving(t.target)))
            .collect();
        self.complete.extend(next);
    }

    fn state(&self, target: TargetId) -> Option<PublicState> {
        self.chain
            .targets
            .iter()
            .find(|t| t.target == target)
            .map(|t| t.state)
    }

    fn settle(&mut self, step: Step) -> Result<(), String> {
        for _ in 0..SETTLE_STEPS_MAX {
            let local = &self.local;
            let next = step(&self.chain, &|t| local[&t]);
            check_invariants(&next)?;
            check_version(&self.chain, &next)?;
            if next == self.chain {
                return Ok(());
            }
            self.observe(&next);
            self.chain = next;
            self.check_safety()?;
        }
        Err(format!(
            "no fixed point after {SETTLE_STEPS_MAX} steps: {}",
            show(&self.chain)
        ))
    }

    /// What the storage nodes do when they learn the new chain: a finished
    /// sync has copied everything; a node told it is SERVING reports
    /// UpToDate; a node told it is SYNCING starts a sync and reports Online
    /// until it finishes (dropping any stale UpToDate claim).
    fn observe(&mut self, next: &Chain) {
        for t in &next.targets {
            let before = self.state(t.target);
            let l = self.local[&t.target];
            if t.state == PublicState::Serving && before == Some(PublicState::Syncing) {
                self.complete.insert(t.target, true);
            }
            if t.state == PublicState::Serving && l == LocalState::Online {
                self.local.insert(t.target, LocalState::UpToDate);
            }
            if t.state == PublicState::Syncing && before != Some(PublicState::Syncing) {
                self.local.insert(t.target, LocalState::Online);
            }
        }
    }

    /// Why each property matters:
    /// - a SERVING target serves reads, so an incomplete one returns stale
    ///   data and, as a future sync source, spreads the loss;
    /// - the LASTSRV target is what the chain restarts from, so an
    ///   incomplete one silently drops acknowledged writes on restart;
    /// - if the chain can serve at all (SERVING or LASTSRV), some target it
    ///   serves from must still hold every acknowledged write.
    fn check_safety(&self) -> Result<(), String> {
        let chain = show(&self.chain);
        for t in &self.chain.targets {
            let serves = matches!(t.state, PublicState::Serving | PublicState::LastSrv);
            if serves && !self.complete[&t.target] {
                return Err(format!(
                    "target {} is {:?} but not complete: {chain}",
                    t.target, t.state
                ));
            }
        }
        let serving: Vec<&ChainTarget> = self
            .chain
            .targets
            .iter()
            .filter(|t| matches!(t.state, PublicState::Serving | PublicState::LastSrv))
            .collect();
        if !serving.is_empty() && !serving.iter().any(|t| self.complete[&t.target]) {
            return Err(format!("acknowledged writes lost: {chain}"));
        }
        Ok(())
    }
}

/// Versions never go down, go up by exactly one per changed step, and an
/// unchanged step returns the chain as it was.
fn check_version(before: &Chain, next: &Chain) -> Result<(), String> {
    if next.targets == before.targets {
        if next.version != before.version {
            return Err(format!("version moved without a change: {}", show(next)));
        }
    } else if next.version != before.version + 1 {
        return Err(format!(
            "version {} -> {} on a change: {}",
            before.version,
            next.version,
            show(next)
        ));
    }
    Ok(())
}

fn event() -> impl Strategy<Value = Event> {
    let i = 0..CHAIN_TARGETS_MAX;
    prop_oneof![
        i.clone().prop_map(Event::Down),
        i.clone().prop_map(Event::Restart),
        i.prop_map(Event::ReportUpToDate),
        Just(Event::Write),
    ]
}

fn public_state() -> impl Strategy<Value = PublicState> {
    prop_oneof![
        Just(PublicState::Serving),
        Just(PublicState::LastSrv),
        Just(PublicState::Syncing),
        Just(PublicState::Waiting),
        Just(PublicState::Offline),
    ]
}

fn local_state() -> impl Strategy<Value = LocalState> {
    prop_oneof![
        Just(LocalState::UpToDate),
        Just(LocalState::Online),
        Just(LocalState::Offline),
    ]
}

proptest! {
    // Integration tests have no lib.rs next to them to persist failures
    // beside; a failure prints its minimal input instead.
    #![proptest_config(ProptestConfig {
        cases: PROPTEST_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_events_keep_acknowledged_writes_safe(
        targets in 1..=CHAIN_TARGETS_MAX,
        events in prop::collection::vec(event(), 0..=EVENTS_MAX),
    ) {
        let mut model = Model::new(targets);
        for (n, e) in events.iter().enumerate() {
            let result = model.apply(*e, correct_step);
            prop_assert!(result.is_ok(), "event {} {:?}: {:?}", n, e, result);
        }
    }

    /// Any chain without duplicate ids, even one breaking the invariants,
    /// steps to a valid chain over the same targets.
    #[test]
    fn any_chain_steps_to_a_valid_chain(
        pairs in prop::collection::vec((public_state(), local_state()), 0..=CHAIN_TARGETS_MAX),
    ) {
        let chain = Chain {
            id: 1,
            version: VERSION_BEFORE,
            targets: pairs
                .iter()
                .zip(1..)
                .map(|(&(state, _), target)| ChainTarget { target, state })
                .collect(),
        };
        let next = next_chain(&chain, |t: TargetId| pairs[(t - 1) as usize].1);
        prop_assert_eq!(check_invariants(&next), Ok(()));
        prop_assert_eq!(check_version(&chain, &next), Ok(()));
        let mut ids: Vec<TargetId> = next.targets.iter().map(|t| t.target).collect();
        ids.sort_unstable();
        prop_assert_eq!(ids, (1..=pairs.len() as TargetId).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------------------------
// The checker can fail: a wrong machine that trusts WAITING + UpToDate.

/// Like `next_chain`, but promotes a WAITING target claiming UpToDate
/// straight to SERVING.
fn trusts_waiting_step(chain: &Chain, local: &dyn Fn(TargetId) -> LocalState) -> Chain {
    let mut next = next_chain(chain, local);
    let mut changed = false;
    for t in &mut next.targets {
        let was_waiting = chain
            .targets
            .iter()
            .any(|o| o.target == t.target && o.state == PublicState::Waiting);
        if was_waiting && local(t.target) == LocalState::UpToDate {
            t.state = PublicState::Serving;
            changed = true;
        }
    }
    next.targets.sort_by_key(|t| t.state);
    if changed && next.version == chain.version {
        next.version += 1;
    }
    next
}

fn run(step: Step, events: &[Event]) -> Result<(), String> {
    let mut model = Model::new(2);
    events.iter().try_for_each(|&e| model.apply(e, step))
}

#[test]
fn safety_checker_catches_a_machine_that_trusts_waiting_targets() {
    // Target 2 misses a write while down, then falsely claims UpToDate.
    let events = [
        Event::Down(1),
        Event::Write,
        Event::ReportUpToDate(1),
        Event::Write,
    ];
    assert_eq!(run(correct_step, &events), Ok(()));
    let wrong = run(trusts_waiting_step, &events).unwrap_err();
    assert!(
        wrong.contains("target 2 is Serving but not complete"),
        "{wrong}"
    );
}

#[test]
fn false_up_to_date_claim_leads_to_syncing_not_serving() {
    let mut model = Model::new(2);
    for e in [Event::Down(1), Event::Write, Event::ReportUpToDate(1)] {
        model.apply(e, correct_step).unwrap();
    }
    assert_eq!(show(&model.chain), "S1 Y2");
    assert!(!model.complete[&2]);
    // Now the sync really finishes.
    model.apply(Event::ReportUpToDate(1), correct_step).unwrap();
    assert_eq!(show(&model.chain), "S1 S2");
    assert!(model.complete[&2]);
}
