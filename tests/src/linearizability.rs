//! Linearizability checker for the history of one read/write register: the
//! per-chunk client operations that the CRAQ storage fault tests record.
//!
//! Never runs servers, reads clocks or keeps state between calls: callers
//! record [`Event`]s during a run (times from one monotonic clock, e.g.
//! nanoseconds since the test started) and hand them to [`check_register`]
//! afterwards.
//!
//! # Model
//!
//! The register starts at `initial`. `Write(v)` sets it to `v`; `Read(v)` is a
//! read that returned `v`. Each operation takes effect atomically at one point
//! between its invocation and its completion; `a` precedes `b` in real time
//! iff `a.completed < b.invoked`, so equal times count as concurrent. A history
//! is linearizable iff one total order of its operations respects real-time
//! precedence and is a legal sequential run of the register.
//!
//! A write with `completed: None` has an unknown outcome (client timeout, dead
//! node): it takes effect at any point after its invocation, or never. A read
//! with `completed: None` returned nothing and is ignored.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's memoization, laid out as in Porcupine.
//! Invocations and completions sit in one doubly linked list sorted by time.
//! A depth-first search picks the next operation to linearize among the
//! invocations before the first completion still in the list (an operation can
//! go next only if no other unlinearized operation completed before it was
//! invoked), applies it to the register, lifts it out of the list, and
//! backtracks on reaching a completion. Each state `(set of linearized
//! operations as a bitset, register value)` is expanded at most once: a cache
//! keyed by an incremental Zobrist hash remembers the states already seen
//! (the search only leaves a state unsolved once it failed).
//!
//! Operations are numbered in invocation order, so the linearized ones are
//! nearly a prefix and a state's key is short: the count of leading all-ones
//! words of the bitset plus the few words after them.
//!
//! Before the search: a read of a value that is neither `initial` nor written
//! by any write is reported at once; an unknown-outcome write whose value no
//! read returned is dropped (leaving it out never breaks an order); and an
//! unknown-outcome write that is the only writer of a value some read returned
//! becomes a required op completing when that read first completed (it must
//! precede the read). The remaining unknown-outcome writes are optional, and
//! the search prunes orders equivalent to others: an optional write goes in
//! only right before a read of its value while the register holds another
//! value, and only the earliest-invoked unused one of its value (they are
//! interchangeable). The cache then counts a state as seen if a seen state
//! had the same required ops and register but at most as many optional
//! writes used per value.
//!
//! # Complexity
//!
//! Time is O(states × w) steps, where `w` is the number of operations
//! concurrent at a state's frontier, and each state costs a few words. When
//! at most `c` operations overlap, a linearizable history is usually accepted
//! after about `n · c` steps, and any history visits at most about
//! `n · 2^c · values` states: 5000 operations overlapping ~8 at a time check
//! in ~15 ms when accepted and ~60 ms when rejected (unoptimized build, unique
//! written values). The worst cases are exponential: `k` mutually concurrent
//! writes followed by contradictory reads visit up to `2^k · k` states, and
//! many optional writes of a few repeated values multiply the states by the
//! combinations of how many of each are used; rejecting such a history can
//! exhaust the limits. Writing unique (versioned) values avoids the second.
//!
//! # Limits
//!
//! At most [`HISTORY_OPS_MAX`] operations after the shortcuts, at most
//! [`SEARCH_STEPS_MAX`] search steps (about 10 s unoptimized) and at most
//! [`SEARCH_CACHE_WORDS_MAX`] words (256 MiB) of cached states. Past a limit
//! the check returns [`CheckError::TooLarge`] or
//! [`CheckError::SearchExhausted`], never a verdict;
//! [`check_register_within`] takes other [`Limits`].

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Operations a history may hold after the shortcuts (see the module docs).
pub const HISTORY_OPS_MAX: usize = 10_000;

/// Search steps (one tried invocation or one backtrack each) before giving up.
pub const SEARCH_STEPS_MAX: u64 = 1 << 25;

/// 64-bit words of cached search states before giving up (256 MiB).
pub const SEARCH_CACHE_WORDS_MAX: usize = 1 << 25;

/// Operations of the longest legal prefix shown in a [`Violation::NoOrder`].
pub const VIOLATION_TAIL_OPS: usize = 8;

/// Largest operation count the list and cache indices (`u32`) can hold.
const OPS_INDEX_MAX: usize = (u32::MAX / 2 - 1) as usize;

/// End of the entry list, empty cache chain, absent entry.
const NIL: u32 = u32::MAX;

const _: () = assert!(HISTORY_OPS_MAX <= OPS_INDEX_MAX);

/// One register operation, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op<V> {
    /// Sets the register to the value.
    Write(V),
    /// A read that returned the value.
    Read(V),
}

/// One operation with its invocation and completion times from one monotonic
/// clock, in any unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Event<V> {
    pub op: Op<V>,
    pub invoked: u64,
    /// `None`: the outcome is unknown (timeout, dead node). A write may then
    /// take effect at any time after `invoked`, or never; a read is ignored.
    pub completed: Option<u64>,
}

/// Limits on one check; [`Limits::default`] uses the module constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Operations after the shortcuts; values above 2^31 - 2 act as 2^31 - 2.
    pub ops_max: usize,
    pub steps_max: u64,
    pub cache_words_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            ops_max: HISTORY_OPS_MAX,
            steps_max: SEARCH_STEPS_MAX,
            cache_words_max: SEARCH_CACHE_WORDS_MAX,
        }
    }
}

/// Why a check failed: a verdict ([`CheckError::NotLinearizable`]) or no
/// verdict (bad input, a limit hit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckError<V> {
    /// No legal order exists.
    NotLinearizable(Violation<V>),
    /// `history[index]` completed before it was invoked.
    CompletedBeforeInvoked {
        index: usize,
        invoked: u64,
        completed: u64,
    },
    /// More than `ops_max` operations left after the shortcuts.
    TooLarge { ops: usize, ops_max: usize },
    /// The search hit [`Limits::steps_max`] or [`Limits::cache_words_max`].
    SearchExhausted { steps: u64, cache_words: usize },
}

/// What makes a history non-linearizable. Indices point into the history
/// given to [`check_register`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation<V> {
    /// A read returned a value that is neither initial nor written by any
    /// write.
    ValueNeverWritten { index: usize, event: Event<V> },
    /// No order works. Describes the first deepest dead end of the search: a
    /// legal prefix of `prefix_ops` operations leaving the register at
    /// `register`, after which `history[index]` (the operation whose
    /// completion closes every way on) cannot be placed. `prefix_tail` holds
    /// the last [`VIOLATION_TAIL_OPS`] operations of that prefix as
    /// `(index, event)`.
    NoOrder {
        index: usize,
        event: Event<V>,
        prefix_ops: usize,
        register: V,
        prefix_tail: Vec<(usize, Event<V>)>,
    },
}

/// Checks that `history` is linearizable for one read/write register that
/// starts at `initial`, within [`Limits::default`].
pub fn check_register<V: Eq + Clone + Hash + fmt::Debug>(
    initial: V,
    history: &[Event<V>],
) -> Result<(), CheckError<V>> {
    check_register_within(initial, history, Limits::default())
}

/// [`check_register`] with explicit limits.
pub fn check_register_within<V: Eq + Clone + Hash + fmt::Debug>(
    initial: V,
    history: &[Event<V>],
    limits: Limits,
) -> Result<(), CheckError<V>> {
    let prepared = prepare(&initial, history, limits.ops_max.min(OPS_INDEX_MAX))?;
    match search(&prepared.ops, &limits) {
        Ok(()) => Ok(()),
        Err(SearchFailure::Exhausted { steps, cache_words }) => {
            Err(CheckError::SearchExhausted { steps, cache_words })
        }
        Err(SearchFailure::NoOrder(dead_end)) => Err(CheckError::NotLinearizable(no_order(
            history, &prepared, &dead_end,
        ))),
    }
}

/// An operation the search considers; `value` is an interned value id.
#[derive(Clone, Copy, Debug)]
struct PreparedOp {
    /// Index into the caller's history.
    index: usize,
    write: bool,
    value: u32,
    invoked: u64,
    /// For a lost write, the completion of the first read of its value when
    /// it is that value's only writer (see `prepare`).
    completed: Option<u64>,
    /// A lost write that may stay out of the order.
    optional: bool,
    /// Among the optional writes of the same value, in invocation order.
    rank: u32,
    /// For an optional write: its value's index among the values with
    /// optional writes. Otherwise: its index among the other ops.
    slot: u32,
}

struct Prepared<'h, V> {
    ops: Vec<PreparedOp>,
    /// Value id to value; id 0 is the initial value.
    values: Vec<&'h V>,
}

/// Validates times, interns values, applies the two shortcuts and the size
/// limit.
fn prepare<'h, V: Eq + Clone + Hash>(
    initial: &'h V,
    history: &'h [Event<V>],
    ops_max: usize,
) -> Result<Prepared<'h, V>, CheckError<V>> {
    for (index, event) in history.iter().enumerate() {
        if let Some(completed) = event.completed {
            if completed < event.invoked {
                return Err(CheckError::CompletedBeforeInvoked {
                    index,
                    invoked: event.invoked,
                    completed,
                });
            }
        }
    }
    let mut ids: HashMap<&V, u32> = HashMap::new();
    let mut values = vec![initial];
    ids.insert(initial, 0);
    for event in history {
        if let Op::Write(v) = &event.op {
            ids.entry(v).or_insert_with(|| {
                values.push(v);
                // At most `history.len() + 1` values; checked below.
                (values.len() - 1) as u32
            });
        }
    }
    if values.len() > OPS_INDEX_MAX {
        return Err(CheckError::TooLarge {
            ops: values.len(),
            ops_max,
        });
    }
    let (writers, first_read) = value_stats(history, &ids, values.len())?;
    let mut ops = Vec::new();
    for (index, event) in history.iter().enumerate() {
        let (write, v) = match &event.op {
            Op::Write(v) => (true, v),
            Op::Read(v) => (false, v),
        };
        let Some(&value) = ids.get(v) else { continue };
        let first_read = first_read[value as usize];
        let (completed, optional) = match (write, event.completed) {
            (_, Some(completed)) => (Some(completed), false),
            (false, None) => continue,
            // Never read: leaving it out never breaks an order.
            (true, None) if first_read.is_none() => continue,
            // The only writer of a value a read returned must precede that
            // read, so it is not lost: it completes by the read's end.
            (true, None) if value != 0 && writers[value as usize] == 1 => {
                match first_read.filter(|&read| read >= event.invoked) {
                    Some(read) => (Some(read), false),
                    None => (None, true),
                }
            }
            (true, None) => (None, true),
        };
        ops.push(PreparedOp {
            index,
            write,
            value,
            invoked: event.invoked,
            completed,
            optional,
            rank: 0,
            slot: 0,
        });
    }
    // Invocation order keeps the linearized ops nearly a prefix (see `OpSet`).
    ops.sort_by_key(|op| (op.invoked, op.index));
    let mut optional_counts = vec![0u32; values.len()];
    let mut value_slots: HashMap<u32, u32> = HashMap::new();
    let mut required = 0;
    for op in &mut ops {
        if op.optional {
            op.rank = optional_counts[op.value as usize];
            optional_counts[op.value as usize] += 1;
            let slots = value_slots.len() as u32;
            op.slot = *value_slots.entry(op.value).or_insert(slots);
        } else {
            op.slot = required;
            required += 1;
        }
    }
    if ops.len() > ops_max {
        return Err(CheckError::TooLarge {
            ops: ops.len(),
            ops_max,
        });
    }
    Ok(Prepared { ops, values })
}

/// Per value id: the number of writes, and the earliest completion of a
/// read returning it. Fails on a read of a value never written.
#[allow(clippy::type_complexity)]
fn value_stats<V: Eq + Clone + Hash>(
    history: &[Event<V>],
    ids: &HashMap<&V, u32>,
    values: usize,
) -> Result<(Vec<u32>, Vec<Option<u64>>), CheckError<V>> {
    let mut writers = vec![0u32; values];
    let mut first_read: Vec<Option<u64>> = vec![None; values];
    for (index, event) in history.iter().enumerate() {
        match (&event.op, event.completed) {
            (Op::Write(v), _) => {
                if let Some(&id) = ids.get(v) {
                    writers[id as usize] = writers[id as usize].saturating_add(1);
                }
            }
            (Op::Read(_), None) => {}
            (Op::Read(v), Some(completed)) => {
                let Some(&id) = ids.get(v) else {
                    let event = event.clone();
                    return Err(CheckError::NotLinearizable(Violation::ValueNeverWritten {
                        index,
                        event,
                    }));
                };
                let read = &mut first_read[id as usize];
                *read = Some(read.map_or(completed, |read| read.min(completed)));
            }
        }
    }
    Ok((writers, first_read))
}

enum SearchFailure {
    NoOrder(DeadEnd),
    Exhausted { steps: u64, cache_words: usize },
}

/// The first deepest state of the search and what blocked it; op ids and
/// value ids.
struct DeadEnd {
    depth: usize,
    register: u32,
    tail: Vec<u32>,
    blocked: Option<u32>,
}

impl DeadEnd {
    fn reach(&mut self, stack: &[Frame], register: u32) {
        if stack.len() <= self.depth {
            return;
        }
        self.depth = stack.len();
        self.register = register;
        self.tail.clear();
        let tail = &stack[stack.len().saturating_sub(VIOLATION_TAIL_OPS)..];
        self.tail.extend(tail.iter().map(|frame| frame.op));
        self.blocked = None;
    }

    /// Called at every dead end; the first one after a new deepest state is
    /// that state's own.
    fn block(&mut self, depth: usize, op: Option<u32>) {
        if depth == self.depth && self.blocked.is_none() {
            self.blocked = op;
        }
    }
}

/// One linearized operation and the register value before it.
struct Frame {
    op: u32,
    register: u32,
}

/// The WGL search; see the module docs.
fn search(ops: &[PreparedOp], limits: &Limits) -> Result<(), SearchFailure> {
    let mut state = State::new(ops);
    let mut list = EntryList::new(ops);
    let mut cache = StateCache::new(limits.cache_words_max);
    let mut dead_end = DeadEnd {
        depth: 0,
        register: 0,
        tail: Vec::new(),
        blocked: None,
    };
    let mut steps = 0u64;
    let mut cur = list.first();
    while state.pending > 0 {
        if steps == limits.steps_max {
            let cache_words = cache.words();
            return Err(SearchFailure::Exhausted { steps, cache_words });
        }
        steps += 1;
        if let Some(op) = list.invocation_at(cur) {
            let linearized = state.push(op, &mut cache).map_err(|CacheFull| {
                let cache_words = cache.words();
                SearchFailure::Exhausted { steps, cache_words }
            })?;
            if linearized {
                list.lift(op);
                dead_end.reach(&state.stack, state.register);
                cur = list.first();
            } else {
                cur = list.next(cur);
            }
        } else {
            dead_end.block(state.stack.len(), list.op_at(cur));
            let Some(op) = state.pop() else {
                return Err(SearchFailure::NoOrder(dead_end));
            };
            list.unlift(op);
            cur = list.next(list.call_slot[op as usize]);
        }
    }
    Ok(())
}

/// The search state: linearized ops in order and as a set, and the
/// register after them.
struct State<'o> {
    ops: &'o [PreparedOp],
    stack: Vec<Frame>,
    /// The required (not optional) ops linearized, by slot.
    linearized: OpSet,
    /// Zobrist hash of `linearized`.
    hash: u64,
    register: u32,
    /// Per value slot: optional writes linearized, always those of the lowest
    /// ranks.
    optional_used: Vec<u32>,
    /// Ops still to linearize, not counting optional ones.
    pending: usize,
}

impl State<'_> {
    fn new(ops: &[PreparedOp]) -> State<'_> {
        let pending = ops.iter().filter(|op| !op.optional).count();
        let slots = ops
            .iter()
            .filter(|op| op.optional)
            .map(|op| op.slot + 1)
            .max();
        State {
            ops,
            stack: Vec::new(),
            linearized: OpSet::new(pending),
            hash: 0,
            register: 0,
            optional_used: vec![0; slots.unwrap_or(0) as usize],
            pending,
        }
    }

    /// Marks `op` linearized or not, in the set or the optional counts.
    fn flip(&mut self, op: &PreparedOp, linearized: bool) {
        match (op.optional, linearized) {
            (true, true) => self.optional_used[op.slot as usize] += 1,
            (true, false) => self.optional_used[op.slot as usize] -= 1,
            (false, _) => {
                self.linearized.flip(op.slot);
                self.hash ^= op_key(op.slot);
            }
        }
    }

    /// Linearizes `op` next if it may go next and leads to an unseen state.
    fn push(&mut self, op: u32, cache: &mut StateCache) -> Result<bool, CacheFull> {
        let prepared = &self.ops[op as usize];
        if !self.may_go_next(prepared) {
            return Ok(false);
        }
        let Some(register) = apply(prepared, self.register) else {
            return Ok(false);
        };
        self.flip(prepared, true);
        // After an optional write only a read may follow (see `may_go_next`),
        // so the state remembers whether the last op was one.
        let tag = u64::from(register) | u64::from(prepared.optional) << 32;
        let key = self.hash ^ tag_key(tag);
        if !cache.insert(key, &self.linearized, tag, &self.optional_used)? {
            self.flip(prepared, false);
            return Ok(false);
        }
        self.stack.push(Frame {
            op,
            register: self.register,
        });
        self.register = register;
        self.pending -= usize::from(!prepared.optional);
        Ok(true)
    }

    /// Undoes the last [`State::push`], returning its op.
    fn pop(&mut self) -> Option<u32> {
        let frame = self.stack.pop()?;
        let prepared = &self.ops[frame.op as usize];
        self.flip(prepared, false);
        self.register = frame.register;
        self.pending += usize::from(!prepared.optional);
        Some(frame.op)
    }

    /// Prunes orders equivalent to ones tried elsewhere: an optional write
    /// goes in only right before a read of its value (else dropping it leaves
    /// a legal order), only when the register holds another value, and only
    /// the lowest-ranked unused one of its value (all of them invoked by now
    /// and never completing, they are interchangeable).
    fn may_go_next(&self, op: &PreparedOp) -> bool {
        let after_optional = self
            .stack
            .last()
            .is_some_and(|frame| self.ops[frame.op as usize].optional);
        if after_optional && op.write {
            return false;
        }
        if !op.optional {
            return true;
        }
        op.rank == self.optional_used[op.slot as usize] && op.value != self.register
    }
}

/// The register after `op`, or `None` if `op` is a read of another value.
fn apply(op: &PreparedOp, register: u32) -> Option<u32> {
    if op.write {
        Some(op.value)
    } else {
        (op.value == register).then_some(register)
    }
}

/// Linearized ops as a bitset over ops sorted by invocation, tracking its
/// leading all-ones words and trailing zero words: the linearized ops are
/// nearly a prefix, so the words between (the key) are few.
struct OpSet {
    words: Vec<u64>,
    /// Leading words with every bit set.
    full: usize,
    /// One past the last nonzero word, or 0.
    end: usize,
}

impl OpSet {
    fn new(ops: usize) -> OpSet {
        OpSet {
            words: vec![0; ops.div_ceil(64)],
            full: 0,
            end: 0,
        }
    }

    fn flip(&mut self, op: u32) {
        let k = op as usize / 64;
        self.words[k] ^= 1 << (op % 64);
        if self.words[k] != 0 {
            self.end = self.end.max(k + 1);
        }
        while self.end > 0 && self.words[self.end - 1] == 0 {
            self.end -= 1;
        }
        if self.words[k] != u64::MAX {
            self.full = self.full.min(k);
        }
        while self.full < self.words.len() && self.words[self.full] == u64::MAX {
            self.full += 1;
        }
    }

    /// Canonical short form: the count of leading full words and the words
    /// after them up to the last nonzero one.
    fn key(&self) -> (usize, &[u64]) {
        (self.full, &self.words[self.full..self.end.max(self.full)])
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Zobrist key of one linearized operation.
fn op_key(op: u32) -> u64 {
    splitmix64(u64::from(op))
}

/// Zobrist key of a state tag (register value and flags), disjoint from the
/// operation keys' inputs.
fn tag_key(tag: u64) -> u64 {
    splitmix64(tag | 1 << 63)
}

/// Invocations and completions sorted by time (invocations first on equal
/// times), as a doubly linked list with dancing-links lift and unlift. Slot 0
/// is the head; slot `s > 0` is the `s - 1`th entry.
struct EntryList {
    next: Vec<u32>,
    prev: Vec<u32>,
    slot_op: Vec<u32>,
    slot_completes: Vec<bool>,
    call_slot: Vec<u32>,
    return_slot: Vec<u32>,
}

impl EntryList {
    fn new(ops: &[PreparedOp]) -> EntryList {
        let mut entries: Vec<(u64, bool, u32)> = Vec::with_capacity(ops.len() * 2);
        for (op, prepared) in (0u32..).zip(ops) {
            entries.push((prepared.invoked, false, op));
            if let Some(completed) = prepared.completed {
                entries.push((completed, true, op));
            }
        }
        entries.sort_unstable();
        let slots = entries.len() + 1;
        let mut list = EntryList {
            next: (1..=slots as u32).collect(),
            prev: (0..slots as u32).map(|s| s.wrapping_sub(1)).collect(),
            slot_op: vec![NIL; slots],
            slot_completes: vec![false; slots],
            call_slot: vec![NIL; ops.len()],
            return_slot: vec![NIL; ops.len()],
        };
        list.next[slots - 1] = NIL;
        for (slot, &(_, completes, op)) in (1u32..).zip(&entries) {
            list.slot_op[slot as usize] = op;
            list.slot_completes[slot as usize] = completes;
            if completes {
                list.return_slot[op as usize] = slot;
            } else {
                list.call_slot[op as usize] = slot;
            }
        }
        list
    }

    fn first(&self) -> u32 {
        self.next[0]
    }

    fn next(&self, slot: u32) -> u32 {
        self.next[slot as usize]
    }

    /// The op invoked at `slot`, if `slot` is an invocation.
    fn invocation_at(&self, slot: u32) -> Option<u32> {
        let completes = *self.slot_completes.get(slot as usize)?;
        (!completes).then(|| self.slot_op[slot as usize])
    }

    fn op_at(&self, slot: u32) -> Option<u32> {
        self.slot_op.get(slot as usize).copied()
    }

    fn lift(&mut self, op: u32) {
        self.unlink(self.call_slot[op as usize]);
        let ret = self.return_slot[op as usize];
        if ret != NIL {
            self.unlink(ret);
        }
    }

    /// Undoes the matching [`EntryList::lift`]; lifts are undone last first.
    fn unlift(&mut self, op: u32) {
        let ret = self.return_slot[op as usize];
        if ret != NIL {
            self.relink(ret);
        }
        self.relink(self.call_slot[op as usize]);
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = (self.prev[slot as usize], self.next[slot as usize]);
        self.next[prev as usize] = next;
        if next != NIL {
            self.prev[next as usize] = prev;
        }
    }

    fn relink(&mut self, slot: u32) {
        let (prev, next) = (self.prev[slot as usize], self.next[slot as usize]);
        self.next[prev as usize] = slot;
        if next != NIL {
            self.prev[next as usize] = slot;
        }
    }
}

struct CacheFull;

/// Seen states `(required ops linearized, tag, optional writes used)`. A
/// state is seen if a seen state has the same set and tag and at most as many
/// optional writes used per value: the search failed there, and fewer used
/// writes leave every order open that more do. Each entry sits flat in
/// `arena` as `[header, words.., tag, used..]` (see [`OpSet::key`]; the header
/// packs the full-word count and the word count), chained per Zobrist hash of
/// set and tag.
struct StateCache {
    words_max: usize,
    arena: Vec<u64>,
    starts: Vec<u32>,
    chain: Vec<u32>,
    heads: HashMap<u64, u32, BuildHasherDefault<PassThrough>>,
}

impl StateCache {
    fn new(words_max: usize) -> StateCache {
        StateCache {
            words_max,
            arena: Vec::new(),
            starts: Vec::new(),
            chain: Vec::new(),
            heads: HashMap::default(),
        }
    }

    fn words(&self) -> usize {
        self.arena.len()
    }

    /// Adds the state; `Ok(false)` if it was seen.
    fn insert(
        &mut self,
        hash: u64,
        set: &OpSet,
        tag: u64,
        used: &[u32],
    ) -> Result<bool, CacheFull> {
        let (full, words) = set.key();
        // Both fit in 32 bits: ops are at most `OPS_INDEX_MAX`.
        let header = (full as u64) << 32 | words.len() as u64;
        let size = words.len() + 2 + used.len();
        let head = self.heads.get(&hash).copied().unwrap_or(NIL);
        let mut entry = head;
        while entry != NIL {
            let start = self.starts[entry as usize] as usize;
            // Entries with the same header have the same size.
            if self.arena[start] != header {
                entry = self.chain[entry as usize];
                continue;
            }
            let stored = &self.arena[start..start + size];
            let stored_used = &stored[words.len() + 2..];
            if stored[1..=words.len()] == *words
                && stored[words.len() + 1] == tag
                && stored_used
                    .iter()
                    .zip(used)
                    .all(|(&s, &u)| s <= u64::from(u))
            {
                return Ok(false);
            }
            entry = self.chain[entry as usize];
        }
        if self.arena.len() + size > self.words_max {
            return Err(CacheFull);
        }
        let start = u32::try_from(self.arena.len()).map_err(|_| CacheFull)?;
        let entry = u32::try_from(self.chain.len()).map_err(|_| CacheFull)?;
        if entry == NIL {
            return Err(CacheFull);
        }
        self.arena.push(header);
        self.arena.extend_from_slice(words);
        self.arena.push(tag);
        self.arena.extend(used.iter().map(|&u| u64::from(u)));
        self.starts.push(start);
        self.chain.push(head);
        self.heads.insert(hash, entry);
        Ok(true)
    }
}

/// Hasher for keys that are already uniform 64-bit hashes.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = x;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn no_order<V: Clone>(
    history: &[Event<V>],
    prepared: &Prepared<'_, V>,
    dead_end: &DeadEnd,
) -> Violation<V> {
    let placed = |op: u32| {
        let index = prepared.ops[op as usize].index;
        (index, history[index].clone())
    };
    // The search fails only with a pending completion, so `ops` is not
    // empty and every dead end had a blocking completion.
    let (index, event) = placed(dead_end.blocked.unwrap_or(0));
    Violation::NoOrder {
        index,
        event,
        prefix_ops: dead_end.depth,
        register: prepared.values[dead_end.register as usize].clone(),
        prefix_tail: dead_end.tail.iter().map(|&op| placed(op)).collect(),
    }
}

impl<V: fmt::Debug> fmt::Display for Op<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write(v) => write!(f, "write({v:?})"),
            Op::Read(v) => write!(f, "read({v:?})"),
        }
    }
}

impl<V: fmt::Debug> fmt::Display for Event<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.completed {
            Some(completed) => write!(f, "{} [{}, {}]", self.op, self.invoked, completed),
            None => write!(f, "{} [{}, ?]", self.op, self.invoked),
        }
    }
}

impl<V: fmt::Debug> fmt::Display for Violation<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::ValueNeverWritten { index, event } => write!(
                f,
                "history[{index}] {event} returned a value that is neither initial nor written"
            ),
            Violation::NoOrder {
                index,
                event,
                prefix_ops,
                register,
                prefix_tail,
            } => {
                write!(
                    f,
                    "no legal order: the longest legal prefix places {prefix_ops} ops and leaves \
                     {register:?}, then history[{index}] {event} cannot be placed"
                )?;
                let skipped = prefix_ops.saturating_sub(prefix_tail.len());
                for (i, (index, event)) in prefix_tail.iter().enumerate() {
                    match (i, skipped) {
                        (0, 0) => write!(f, "; the prefix is ")?,
                        (0, _) => write!(f, "; the prefix ends ")?,
                        _ => write!(f, ", ")?,
                    }
                    write!(f, "history[{index}] {event}")?;
                }
                Ok(())
            }
        }
    }
}

impl<V: fmt::Debug> fmt::Display for CheckError<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::NotLinearizable(violation) => {
                write!(f, "history is not linearizable: {violation}")
            }
            CheckError::CompletedBeforeInvoked {
                index,
                invoked,
                completed,
            } => write!(
                f,
                "history[{index}] completed at {completed} before its invocation at {invoked}"
            ),
            CheckError::TooLarge { ops, ops_max } => {
                write!(f, "history has {ops} ops to check, more than {ops_max}")
            }
            CheckError::SearchExhausted { steps, cache_words } => write!(
                f,
                "no verdict: search gave up after {steps} steps and {cache_words} cached words"
            ),
        }
    }
}

impl<V: fmt::Debug> std::error::Error for CheckError<V> {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(value: u32, invoked: u64, completed: u64) -> Event<u32> {
        Event {
            op: Op::Write(value),
            invoked,
            completed: Some(completed),
        }
    }

    fn r(value: u32, invoked: u64, completed: u64) -> Event<u32> {
        Event {
            op: Op::Read(value),
            invoked,
            completed: Some(completed),
        }
    }

    /// A write whose outcome is unknown.
    fn w_lost(value: u32, invoked: u64) -> Event<u32> {
        Event {
            op: Op::Write(value),
            invoked,
            completed: None,
        }
    }

    fn r_lost(value: u32, invoked: u64) -> Event<u32> {
        Event {
            op: Op::Read(value),
            invoked,
            completed: None,
        }
    }

    fn render(result: Result<(), CheckError<u32>>) -> String {
        match result {
            Ok(()) => "ok".to_string(),
            Err(error) => error.to_string(),
        }
    }

    /// Checks `history` on a register starting at 0; `expect` is "ok" or the
    /// error message.
    fn check(history: &[Event<u32>], expect: &str) {
        check_within(history, Limits::default(), expect);
    }

    fn check_within(history: &[Event<u32>], limits: Limits, expect: &str) {
        let got = render(check_register_within(0, history, limits));
        assert_eq!(got, expect, "history: {history:?}");
    }

    #[test]
    fn empty_history_is_linearizable() {
        check(&[], "ok");
    }

    #[test]
    fn sequential_history_is_linearizable() {
        check(
            &[w(1, 0, 1), r(1, 2, 3), w(2, 4, 5), r(2, 6, 7), r(2, 8, 9)],
            "ok",
        );
    }

    #[test]
    fn read_overlapping_write_sees_old_or_new_value() {
        check(&[w(1, 0, 10), r(0, 2, 5)], "ok");
        check(&[w(1, 0, 10), r(1, 2, 5)], "ok");
        check(&[w(1, 0, 10), r(1, 2, 5), r(1, 6, 8)], "ok");
    }

    #[test]
    fn equal_times_count_as_concurrent() {
        check(&[w(1, 0, 5), r(0, 5, 6)], "ok");
    }

    #[test]
    fn concurrent_writes_with_reads_in_one_order_are_linearizable() {
        // Order: write(2), read(2), write(1), read(1), read(1).
        check(
            &[
                w(1, 0, 10),
                w(2, 1, 11),
                r(2, 5, 6),
                r(1, 7, 8),
                r(1, 12, 13),
            ],
            "ok",
        );
    }

    #[test]
    fn lost_write_read_later_is_linearizable() {
        check(&[w_lost(1, 0), r(1, 5, 6), r(1, 7, 8)], "ok");
        // The lost write may take effect long after its invocation.
        check(&[w(1, 0, 1), w_lost(2, 2), w(3, 3, 4), r(2, 10, 11)], "ok");
    }

    #[test]
    fn lost_write_never_read_is_linearizable() {
        check(&[w(1, 0, 1), w_lost(2, 2), r(1, 5, 6)], "ok");
    }

    #[test]
    fn unfinished_read_is_ignored() {
        check(&[w(1, 0, 1), r_lost(7, 2), r(1, 3, 4)], "ok");
    }

    #[test]
    fn read_of_value_never_written_is_rejected() {
        check(
            &[w(1, 0, 1), r(7, 2, 3)],
            "history is not linearizable: history[1] read(7) [2, 3] returned a value that is \
             neither initial nor written",
        );
    }

    #[test]
    fn stale_read_after_completed_write_is_rejected() {
        check(
            &[w(1, 0, 1), r(0, 2, 3)],
            "history is not linearizable: no legal order: the longest legal prefix places 1 ops \
             and leaves 1, then history[1] read(0) [2, 3] cannot be placed; the prefix is \
             history[0] write(1) [0, 1]",
        );
    }

    #[test]
    fn reads_going_new_then_old_are_rejected() {
        check(
            &[w(1, 0, 1), w(2, 2, 3), r(2, 4, 5), r(1, 6, 7)],
            "history is not linearizable: no legal order: the longest legal prefix places 3 ops \
             and leaves 2, then history[3] read(1) [6, 7] cannot be placed; the prefix is \
             history[0] write(1) [0, 1], history[1] write(2) [2, 3], history[2] read(2) [4, 5]",
        );
    }

    #[test]
    fn lost_write_seen_then_unseen_is_rejected() {
        check(
            &[w_lost(1, 0), r(1, 2, 3), r(0, 4, 5)],
            "history is not linearizable: no legal order: the longest legal prefix places 2 ops \
             and leaves 1, then history[2] read(0) [4, 5] cannot be placed; the prefix is \
             history[0] write(1) [0, ?], history[1] read(1) [2, 3]",
        );
    }

    #[test]
    fn reads_disagreeing_after_concurrent_writes_are_rejected() {
        check(
            &[w(1, 0, 10), w(2, 0, 10), r(1, 11, 12), r(2, 13, 14)],
            "history is not linearizable: no legal order: the longest legal prefix places 3 ops \
             and leaves 1, then history[3] read(2) [13, 14] cannot be placed; the prefix is \
             history[1] write(2) [0, 10], history[0] write(1) [0, 10], history[2] read(1) [11, 12]",
        );
    }

    #[test]
    fn long_prefix_is_shown_by_its_tail() {
        let mut history: Vec<Event<u32>> = (0..20u32)
            .map(|i| w(i + 1, 2 * u64::from(i), 2 * u64::from(i) + 1))
            .collect();
        history.push(r(3, 100, 101));
        let expect = "history is not linearizable: no legal order: the longest legal prefix \
                      places 20 ops and leaves 20, then history[20] read(3) [100, 101] cannot be \
                      placed; the prefix ends history[12] write(13) [24, 25], history[13] \
                      write(14) [26, 27], history[14] write(15) [28, 29], history[15] write(16) \
                      [30, 31], history[16] write(17) [32, 33], history[17] write(18) [34, 35], \
                      history[18] write(19) [36, 37], history[19] write(20) [38, 39]";
        check(&history, expect);
    }

    #[test]
    fn completion_before_invocation_is_an_error() {
        check(
            &[w(1, 0, 1), r(1, 5, 4)],
            "history[1] completed at 4 before its invocation at 5",
        );
    }

    #[test]
    fn history_over_the_op_limit_is_an_error() {
        let history: Vec<Event<u32>> = (0..=HISTORY_OPS_MAX as u64)
            .map(|i| w(1, 2 * i, 2 * i + 1))
            .collect();
        check(&history, "history has 10001 ops to check, more than 10000");
        let limits = Limits {
            ops_max: 2,
            ..Limits::default()
        };
        // Unobserved lost writes and unfinished reads do not count.
        check_within(
            &[w(1, 0, 1), w_lost(2, 2), r_lost(1, 3), r(1, 4, 5)],
            limits,
            "ok",
        );
        check_within(
            &[w(1, 0, 1), r(1, 2, 3), r(1, 4, 5)],
            limits,
            "history has 3 ops to check, more than 2",
        );
    }

    /// `writes` mutually concurrent writes, then two reads that disagree.
    fn concurrent_writes_then_disagreeing_reads(writes: u32) -> Vec<Event<u32>> {
        let mut history: Vec<Event<u32>> = (1..=writes).map(|v| w(v, 0, 10)).collect();
        history.push(r(1, 11, 12));
        history.push(r(2, 13, 14));
        history
    }

    #[test]
    fn search_over_the_step_limit_is_an_error() {
        let limits = Limits {
            steps_max: 1000,
            ..Limits::default()
        };
        check_within(
            &concurrent_writes_then_disagreeing_reads(16),
            limits,
            "no verdict: search gave up after 1000 steps and 858 cached words",
        );
    }

    #[test]
    fn search_over_the_cache_limit_is_an_error() {
        let limits = Limits {
            cache_words_max: 100,
            ..Limits::default()
        };
        check_within(
            &concurrent_writes_then_disagreeing_reads(16),
            limits,
            "no verdict: search gave up after 64 steps and 99 cached words",
        );
    }

    /// Small deterministic generator for the large histories below.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % bound
        }
    }

    /// One recorded operation of a sequential run: `(write, value, delay
    /// before its linearization point, delay after it, outcome lost,
    /// lost write applied)`.
    type Step = (bool, u32, u64, u64, bool, bool);

    /// A history from a sequential run: op `i` takes effect at time `10 * i`
    /// (lost writes only if applied), surrounded by its delays.
    fn sequential_history(steps: &[Step]) -> Vec<Event<u32>> {
        let mut register = 0;
        let mut history = Vec::new();
        for (i, &(write, value, before, after, lost, applied)) in (0u64..).zip(steps) {
            let point = 1000 + 10 * i;
            let invoked = point - before;
            let completed = (!lost).then_some(point + after);
            let op = if write {
                if !lost || applied {
                    register = value;
                }
                Op::Write(value)
            } else {
                Op::Read(register)
            };
            history.push(Event {
                op,
                invoked,
                completed,
            });
        }
        history
    }

    /// `ops` random steps, each overlapping about `2 * overlap` others; write
    /// values are `0..values`, or unique (versioned) for `None`.
    fn random_steps(rng: &mut XorShift, ops: u32, overlap: u64, values: Option<u32>) -> Vec<Step> {
        (0..ops)
            .map(|i| {
                let write = rng.below(3) == 0;
                let lost = write && rng.below(50) == 0;
                let before = rng.below(overlap * 10);
                let after = rng.below(overlap * 10);
                (
                    write,
                    values.map_or(i + 1, |values| rng.below(values.into()) as u32),
                    before,
                    after,
                    lost,
                    rng.below(2) == 0,
                )
            })
            .collect()
    }

    /// Checks a 5000-op history from a sequential run, then the same with two
    /// reads going backwards appended after everything completed: that forces
    /// the search through every state of the whole history.
    fn check_large_history(seed: u64, values: Option<u32>) {
        let mut rng = XorShift(seed);
        let steps = random_steps(&mut rng, 5000, 4, values);
        let mut history = sequential_history(&steps);
        let start = std::time::Instant::now();
        check(&history, "ok");
        let accepted = start.elapsed();
        let last = history
            .iter()
            .filter_map(|e| e.completed)
            .max()
            .unwrap_or(0);
        history.push(w(10_001, last + 1, last + 2));
        history.push(w(10_002, last + 3, last + 4));
        history.push(r(10_002, last + 5, last + 6));
        history.push(r(10_001, last + 7, last + 8));
        let start = std::time::Instant::now();
        let got = render(check_register(0, &history));
        let rejected = start.elapsed();
        let expect = "history is not linearizable: no legal order";
        assert!(got.starts_with(expect), "{got}");
        eprintln!(
            "5000 ops, values {values:?}: accepted in {accepted:?}, rejected in {rejected:?}"
        );
    }

    #[test]
    fn large_history_with_versioned_values_checks_fast() {
        check_large_history(0x5eed_1234_5678_9abc, None);
    }

    #[test]
    fn large_history_with_few_values_and_no_lost_writes_checks_fast() {
        // With lost writes of repeated values that reads return, rejecting
        // this history exhausts the search: the module docs' worst case.
        let mut rng = XorShift(0x5eed_1234_5678_9abc);
        let mut steps = random_steps(&mut rng, 5000, 4, Some(4));
        for step in &mut steps {
            step.4 = false;
        }
        let mut history = sequential_history(&steps);
        check(&history, "ok");
        let last = history
            .iter()
            .filter_map(|e| e.completed)
            .max()
            .unwrap_or(0);
        history.push(w(1, last + 1, last + 2));
        history.push(w(2, last + 3, last + 4));
        history.push(r(2, last + 5, last + 6));
        history.push(r(1, last + 7, last + 8));
        let got = render(check_register(0, &history));
        assert!(
            got.starts_with("history is not linearizable: no legal order"),
            "{got}"
        );
    }

    #[test]
    fn large_history_with_few_values_and_lost_writes_is_accepted() {
        let mut rng = XorShift(0x0123_4567_89ab_cdef);
        let steps = random_steps(&mut rng, 5000, 4, Some(4));
        check(&sequential_history(&steps), "ok");
    }

    /// The definition, searched exhaustively: some order of all finished ops
    /// and any subset of the lost writes respects real time and the register.
    fn brute_force(initial: u32, history: &[Event<u32>]) -> bool {
        let ops: Vec<&Event<u32>> = history
            .iter()
            .filter(|e| e.completed.is_some() || matches!(e.op, Op::Write(_)))
            .collect();
        let mut used = vec![false; ops.len()];
        let mut order = Vec::new();
        brute_force_extend(&ops, &mut used, &mut order, initial)
    }

    fn brute_force_extend(
        ops: &[&Event<u32>],
        used: &mut [bool],
        order: &mut Vec<usize>,
        register: u32,
    ) -> bool {
        let done = ops
            .iter()
            .zip(used.iter())
            .all(|(e, &u)| u || e.completed.is_none());
        if done {
            return true;
        }
        for x in 0..ops.len() {
            if used[x] {
                continue;
            }
            // `x` may follow every placed op: none of them was invoked after
            // `x` completed.
            let after_placed = order.iter().all(|&a| match ops[x].completed {
                Some(completed) => completed >= ops[a].invoked,
                None => true,
            });
            let next = match ops[x].op {
                Op::Write(v) => Some(v),
                Op::Read(v) => (v == register).then_some(register),
            };
            let Some(next) = next else { continue };
            if !after_placed {
                continue;
            }
            used[x] = true;
            order.push(x);
            let found = brute_force_extend(ops, used, order, next);
            order.pop();
            used[x] = false;
            if found {
                return true;
            }
        }
        false
    }

    #[test]
    fn brute_force_agrees_on_the_named_cases() {
        assert!(brute_force(0, &[w(1, 0, 10), r(0, 2, 5)]));
        assert!(brute_force(0, &[w_lost(1, 0), r(1, 5, 6)]));
        assert!(!brute_force(0, &[w(1, 0, 1), r(0, 2, 3)]));
        assert!(!brute_force(0, &[w_lost(1, 0), r(1, 2, 3), r(0, 4, 5)]));
    }

    fn small_event() -> impl Strategy<Value = Event<u32>> {
        (
            any::<bool>(),
            1u32..=3,
            0u32..=3,
            0u64..20,
            0u64..8,
            0u32..5,
        )
            .prop_map(|(write, written, read, invoked, length, outcome)| Event {
                op: if write {
                    Op::Write(written)
                } else {
                    Op::Read(read)
                },
                invoked,
                completed: (outcome != 0).then_some(invoked + length),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn checker_agrees_with_brute_force(
            history in prop::collection::vec(small_event(), 0..=8),
        ) {
            let expected = brute_force(0, &history);
            let got = check_register(0, &history);
            prop_assert!(
                !matches!(
                    got,
                    Err(CheckError::SearchExhausted { .. } | CheckError::TooLarge { .. })
                ),
                "no verdict: {got:?}"
            );
            prop_assert_eq!(got.is_ok(), expected, "{}", render(got.clone()));
        }
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            prop::bool::weighted(0.4),
            0u32..6,
            0u64..40,
            0u64..40,
            prop::bool::weighted(0.05),
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn sequential_runs_with_delays_are_linearizable(
            steps in prop::collection::vec(step(), 100..400),
        ) {
            let history = sequential_history(&steps);
            let got = render(check_register(0, &history));
            prop_assert_eq!(got, "ok");
        }
    }
}
