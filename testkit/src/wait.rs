//! Polling helper: wait for a condition with a deadline instead of sleeping.

use std::fmt::Debug;
use std::time::Duration;

use tokio::time::Instant;

/// What a [`wait_until`] condition may return.
///
/// * `bool`: done when `true`;
/// * `Option<T>`: done when `Some(t)`, which is handed back;
/// * `anyhow::Result<bool>` / `anyhow::Result<Option<T>>`: as above, and an
///   `Err` means "not yet": polling goes on and the error text is kept, so a
///   condition can report its state with `anyhow::bail!("only {n} rows")`.
pub trait PollOutcome {
    type Output;
    /// `Ok(Some(_))`: done; `Ok(None)`: not yet; `Err(text)`: not yet, with a reason.
    fn into_outcome(self) -> Result<Option<Self::Output>, String>;
    /// How a "not yet" without an error is described in the failure message.
    fn pending_text() -> &'static str;
}

impl PollOutcome for bool {
    type Output = ();
    fn into_outcome(self) -> Result<Option<()>, String> {
        Ok(self.then_some(()))
    }
    fn pending_text() -> &'static str {
        "condition returned false"
    }
}

impl<T> PollOutcome for Option<T> {
    type Output = T;
    fn into_outcome(self) -> Result<Option<T>, String> {
        Ok(self)
    }
    fn pending_text() -> &'static str {
        "condition returned None"
    }
}

impl<P: PollOutcome, E: Debug> PollOutcome for Result<P, E> {
    type Output = P::Output;
    fn into_outcome(self) -> Result<Option<P::Output>, String> {
        match self {
            Ok(p) => p.into_outcome(),
            // `{:?}` of an anyhow::Error prints the whole cause chain.
            Err(e) => Err(format!("{e:?}")),
        }
    }
    fn pending_text() -> &'static str {
        P::pending_text()
    }
}

/// Polls `condition` every `poll_interval` until it reports success (see
/// [`PollOutcome`]) and returns the produced value; fails once `timeout` has
/// passed, with a message containing the last error or state. The condition
/// is always tried at least once; a single attempt that is still running at
/// the deadline is abandoned.
///
/// ```ignore
/// let n = wait_until(Duration::from_secs(10), Duration::from_millis(50), async || {
///     let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&pool).await?;
///     if n < 3 { anyhow::bail!("{n} rows so far") }
///     Ok(Some(n))
/// }).await?;
/// ```
pub async fn wait_until<R, F>(
    timeout: Duration,
    poll_interval: Duration,
    condition: F,
) -> anyhow::Result<R::Output>
where
    R: PollOutcome,
    F: AsyncFnMut() -> R,
{
    wait_until_named("condition", timeout, poll_interval, condition).await
}

/// [`wait_until`] with a description of what is awaited, used in the error.
pub async fn wait_until_named<R, F>(
    what: &str,
    timeout: Duration,
    poll_interval: Duration,
    mut condition: F,
) -> anyhow::Result<R::Output>
where
    R: PollOutcome,
    F: AsyncFnMut() -> R,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut attempts = 0u64;
    let mut last: String;
    loop {
        attempts += 1;
        // The first attempt gets at least a little time even with a zero timeout.
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match tokio::time::timeout(budget, condition()).await {
            Ok(outcome) => match outcome.into_outcome() {
                Ok(Some(value)) => return Ok(value),
                Ok(None) => last = R::pending_text().to_string(),
                Err(e) => last = format!("error: {e}"),
            },
            Err(_) => last = "the last attempt was still running at the deadline".to_string(),
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(poll_interval.min(deadline - now)).await;
    }
    anyhow::bail!(
        "timed out after {:.1?} waiting for {what} ({attempts} attempts); last state: {last}",
        start.elapsed()
    )
}
