//! The retry loop around a transaction body.

use std::time::{Duration, Instant};

use crate::{KvEngine, KvError, Transaction};

/// Bounds for [`run`]: attempts, total time, and the backoff between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts_max: u32,
    pub elapsed_max: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 100,
            elapsed_max: Duration::from_secs(10),
            backoff_initial: Duration::from_micros(200),
            backoff_max: Duration::from_millis(50),
        }
    }
}

/// Run `body` in a fresh transaction and commit it, retrying retryable
/// [`KvError`]s (from the body or the commit) with exponential backoff and
/// full jitter until `policy` runs out, then `KvError::RetryLimit`.
///
/// `body` may run several times and must be idempotent: its effects outside the
/// transaction must be safe to repeat. Errors of type `E` that do not come from
/// the KV layer end the loop at once and are returned unchanged.
pub fn run<T, E>(
    engine: &dyn KvEngine,
    policy: RetryPolicy,
    mut body: impl FnMut(&mut dyn Transaction) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<KvError> + AsKvError,
{
    let started = Instant::now();
    let mut backoff = policy.backoff_initial;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let outcome = attempt(engine, &mut body);
        let err = match outcome {
            Ok(value) => return Ok(value),
            Err(err) => err,
        };
        let retryable = err.as_kv_error().is_some_and(KvError::is_retryable);
        if !retryable {
            return Err(err);
        }
        let elapsed = started.elapsed();
        if attempts >= policy.attempts_max || elapsed >= policy.elapsed_max {
            let last = err.as_kv_error().cloned().unwrap_or(KvError::Conflict);
            return Err(E::from(KvError::RetryLimit {
                attempts,
                elapsed,
                last: Box::new(last),
            }));
        }
        let sleep = jitter(backoff).min(policy.elapsed_max.saturating_sub(elapsed));
        std::thread::sleep(sleep);
        backoff = (backoff * 2).min(policy.backoff_max);
    }
}

fn attempt<T, E>(
    engine: &dyn KvEngine,
    body: &mut impl FnMut(&mut dyn Transaction) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<KvError>,
{
    let mut txn = engine.begin()?;
    let value = body(txn.as_mut())?;
    txn.commit()?;
    Ok(value)
}

fn jitter(max: Duration) -> Duration {
    let nanos = max.as_nanos().min(u64::MAX as u128) as u64;
    Duration::from_nanos(rand::random_range(0..=nanos))
}

/// Lets [`run`] see whether a caller's error is a retryable KV error.
pub trait AsKvError {
    fn as_kv_error(&self) -> Option<&KvError>;
}

impl AsKvError for KvError {
    fn as_kv_error(&self) -> Option<&KvError> {
        Some(self)
    }
}
