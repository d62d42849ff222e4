//! The audit trail: who got which tenant's token (by fingerprint, never the token), admin
//! mutations, refused requests. Written off the hot path through a bounded queue drained in
//! batches; entries in one batch that are identical but for their request id are coalesced
//! into one row with a count and the first request id.
//!
//! `fail_closed` (default): a token whose entry cannot be queued is not released.
//! `best_effort`: such entries are dropped, counted and logged.
//!
//! Everything an authenticated caller does (token fetches, proxied calls, invalidations, scope
//! refusals, failed fetches) goes through that queue, under the same rule: recorded, or refused
//! with 503 `audit_unavailable`. Where the action has an effect outside the broker (a proxied
//! call, an invalidation) a slot is reserved first (`reserve`), so the entry of an action that
//! happened can never be lost for want of room.
//!
//! Unauthenticated refusals take a separate path: a bounded map that coalesces them (same
//! action, outcome, tenant, detail) into one row per flush, keeping the first request id; new
//! kinds of rows are dropped once it holds `SIDE_ROWS`. A flood of bad credentials therefore
//! costs a few rows a second and never takes a slot a caller's entry needs. A tenant id is
//! stored only if it is a valid `TenantId`.

pub mod store;

/// What an admin change writes with it, so both commit or neither does.
pub use crate::db::AlsoWrite;
pub use store::InSameTransaction;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::metrics::Metrics;
use crate::tenants::TenantId;
use crate::time::now_ms;

/// What an entry records: a caller's token action, an admin's change, a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Token,
    Admin,
    Refused,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Admin => "admin",
            Self::Refused => "refused",
        }
    }

    /// The kind a stored spelling names; `None` for one this build does not know.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Token, Self::Admin, Self::Refused]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// One audit entry. Shared strings, so building one on the token path allocates nothing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    pub kind: Kind,
    pub action: Cow<'static, str>,
    pub outcome: Cow<'static, str>,
    pub caller: Option<Arc<str>>,
    pub auth_method: Option<crate::auth::AuthMethod>,
    pub tenant: Option<Arc<str>>,
    pub source: Option<crate::broker::Source>,
    pub fingerprint: Option<Arc<str>>,
    pub detail: Option<String>,
    pub request_id: Option<String>,
}

impl Entry {
    pub fn new(
        kind: Kind,
        action: impl Into<Cow<'static, str>>,
        outcome: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            kind,
            action: action.into(),
            outcome: outcome.into(),
            caller: None,
            auth_method: None,
            tenant: None,
            source: None,
            fingerprint: None,
            detail: None,
            request_id: None,
        }
    }
}

/// A stored row (an entry with its times and count).
#[derive(Clone, Debug)]
pub struct Row {
    pub id: i64,
    pub at_ms: i64,
    pub last_at_ms: i64,
    pub count: i64,
    pub entry: Entry,
}

#[derive(Debug, thiserror::Error)]
#[error("the audit trail cannot take this entry (queue full or writer stopped)")]
pub struct AuditUnavailable;

// Entries are nearly every message; boxing them would cost an allocation per token handed out.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Entry(i64, Entry),
    Flush(oneshot::Sender<()>),
}

/// Best-effort entries waiting for the next flush: entry (without request id) to
/// (first at, last at, count, first request id).
type Side = HashMap<Entry, (i64, i64, i64, Option<String>)>;

/// What happens to a token whose audit entry cannot be queued (`BROKER_AUDIT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditMode {
    FailClosed,
    BestEffort,
}

/// The audit queue handle.
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    side: Arc<Mutex<Side>>,
    mode: AuditMode,
    metrics: Arc<Metrics>,
    /// Why the last batch could not be written, while writes fail (for readiness).
    failing: Arc<Mutex<Option<String>>>,
}

/// Distinct best-effort rows held between two flushes.
pub const SIDE_ROWS: usize = 1_000;

/// How often the writer takes what is queued.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// Batches are written at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Distinct rows per batch.
const BATCH_ROWS: usize = 500;

impl Audit {
    /// Starts the writer. `retention_days` prunes older rows hourly.
    pub fn start(
        db: Db,
        mode: AuditMode,
        capacity: usize,
        retention_days: u64,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let side = Arc::new(Mutex::new(Side::new()));
        let failing = Arc::new(Mutex::new(None));
        tokio::spawn(writer(
            db.clone(),
            rx,
            side.clone(),
            metrics.clone(),
            capacity.max(1),
            failing.clone(),
        ));
        let retention_ms = (retention_days as i64).saturating_mul(86_400_000);
        tokio::spawn(async move {
            loop {
                match store::prune(&db, now_ms() - retention_ms).await {
                    Ok(n) if n > 0 => tracing::info!(rows = n, "pruned old audit entries"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "audit pruning failed"),
                }
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        });
        Arc::new(Self {
            tx,
            side,
            mode,
            metrics,
            failing,
        })
    }

    /// Why audit rows cannot be written now (the database reads but refuses writes: a full
    /// disk, a lock held elsewhere), or `None` while they are written.
    pub fn write_failure(&self) -> Option<String> {
        self.failing.lock().expect("audit failing").clone()
    }

    /// Queues an entry that guards a token: in `fail_closed` mode a full queue is an error.
    pub fn record(&self, entry: Entry) -> Result<(), AuditUnavailable> {
        match self.tx.try_send(Msg::Entry(now_ms(), entry)) {
            Ok(()) => Ok(()),
            Err(_) if self.mode == AuditMode::BestEffort => {
                self.dropped();
                Ok(())
            }
            Err(_) => {
                self.metrics.audit_dropped.inc();
                Err(AuditUnavailable)
            }
        }
    }

    /// Reserves a place in the queue for the entry of an action about to happen: in
    /// `fail_closed` mode no place means the action must not happen (`AuditUnavailable`).
    pub fn reserve(&self) -> Result<Reserved, AuditUnavailable> {
        match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(Reserved(Some(permit))),
            Err(_) if self.mode == AuditMode::BestEffort => {
                self.dropped();
                Ok(Reserved(None))
            }
            Err(_) => {
                self.metrics.audit_dropped.inc();
                Err(AuditUnavailable)
            }
        }
    }

    /// Records an unauthenticated refusal on the side path: coalesced, bounded, dropped first,
    /// never in the callers' queue. (Anything an authenticated caller did goes to `record`.)
    pub fn record_best_effort(&self, mut entry: Entry) {
        if entry
            .tenant
            .as_deref()
            .is_some_and(|t| TenantId::parse(t).is_err())
        {
            entry.tenant = None;
        }
        let request_id = entry.request_id.take();
        let at = now_ms();
        let mut side = self.side.lock().expect("audit side path");
        let len = side.len();
        match side.get_mut(&entry) {
            Some(row) => {
                row.1 = row.1.max(at);
                row.2 += 1;
            }
            None if len < SIDE_ROWS => {
                side.insert(entry, (at, at, 1, request_id));
            }
            None => {
                drop(side);
                self.dropped();
            }
        }
    }

    fn dropped(&self) {
        let n = self.metrics.audit_dropped.get();
        self.metrics.audit_dropped.inc();
        if n.is_power_of_two() || n == 0 {
            tracing::warn!(
                dropped_total = n + 1,
                "audit entries dropped: the audit queue is full"
            );
        }
    }

    /// Writes everything queued so far (on shutdown), waiting at most `within`.
    pub async fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let sent = tokio::time::timeout(within, self.tx.send(Msg::Flush(tx))).await;
        matches!(sent, Ok(Ok(()))) && matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }
}

/// A place held in the audit queue (see `Audit::reserve`). Dropping it unused frees it.
pub struct Reserved(Option<mpsc::OwnedPermit<Msg>>);

impl Reserved {
    /// Queues the entry in the place held (nothing in `best_effort` mode when there was none).
    pub fn record(self, entry: Entry) {
        if let Some(permit) = self.0 {
            permit.send(Msg::Entry(now_ms(), entry));
        }
    }
}

/// Drains the queue: coalesces, writes a batch every `FLUSH_EVERY` (or when full). A batch
/// the database does not take is kept and retried with backoff while draining goes on, so
/// entries keep coalescing into it during an outage: the queue fills (and `fail_closed`
/// refuses tokens) only once `max_pending` distinct rows wait, not after `capacity` entries
/// that would have merged into a handful of rows.
/// The writer's state: rows coalescing towards the next write, flushes waiting for it, and
/// the backoff while the database refuses.
struct Writer {
    db: Db,
    side: Arc<Mutex<Side>>,
    metrics: Arc<Metrics>,
    max_pending: usize,
    failing: Arc<Mutex<Option<String>>>,
    /// Keyed with foldhash: hashing each entry with SipHash was 5 % of a token fetch's
    /// instructions. (The side path, fed by unauthenticated requests, keeps std's hasher.)
    /// Keyed without the request id: entries that differ only in it are one row with a count
    /// and the first request id, so a caller repeating a failing call cannot fill the queue.
    batch: HashMap<Entry, (i64, i64, i64, Option<String>), foldhash::fast::RandomState>,
    waiting: Vec<oneshot::Sender<()>>,
    delay: Duration,
    retry_at: Option<tokio::time::Instant>,
    last_write: tokio::time::Instant,
    closed: bool,
}

/// What a write attempt came to.
enum Written {
    /// The batch is in the database (or was empty).
    Done,
    /// The database refused; the batch is kept for the retry.
    Refused,
}

async fn writer(
    db: Db,
    rx: mpsc::Receiver<Msg>,
    side: Arc<Mutex<Side>>,
    metrics: Arc<Metrics>,
    max_pending: usize,
    failing: Arc<Mutex<Option<String>>>,
) {
    Writer {
        db,
        side,
        metrics,
        max_pending,
        failing,
        batch: HashMap::default(),
        waiting: Vec::new(),
        delay: Duration::from_millis(100),
        retry_at: None,
        last_write: tokio::time::Instant::now(),
        closed: false,
    }
    .run(rx)
    .await
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            // The writer drains on a tick instead of waiting on each entry: a parked receiver
            // would be woken by every token handed out, a cross-thread wake-up per request.
            tokio::time::sleep(DRAIN_EVERY).await;
            self.drain(&mut rx);
            if !self.due() {
                continue;
            }
            self.take_side_rows();
            if let Written::Refused = self.write().await {
                if self.closed {
                    return self.last_try().await;
                }
                continue;
            }
            self.last_write = tokio::time::Instant::now();
            for done in self.waiting.drain(..) {
                let _ = done.send(());
            }
            if self.closed {
                return;
            }
        }
    }

    /// Takes what the queue holds, coalescing, while fewer than `max_pending` rows wait.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Msg>) {
        while self.batch.len() < self.max_pending {
            match rx.try_recv() {
                Ok(Msg::Entry(at, mut e)) => {
                    let request_id = e.request_id.take();
                    self.merge(e, (at, at, 1, request_id));
                }
                Ok(Msg::Flush(done)) => self.waiting.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.closed = true;
                    break;
                }
            }
        }
    }

    /// Whether to write now: not inside a backoff (unless shutting down), and the flush
    /// interval passed, the batch is full, someone waits for a flush, a retry is due, or the
    /// queue closed.
    fn due(&self) -> bool {
        let now = tokio::time::Instant::now();
        if self.retry_at.is_some_and(|at| now < at) && !self.closed {
            return false;
        }
        self.last_write.elapsed() >= FLUSH_EVERY
            || self.batch.len() >= BATCH_ROWS
            || !self.waiting.is_empty()
            || self.retry_at.is_some()
            || self.closed
    }

    /// Side-path rows join the batch only while it has room (a database outage makes the side
    /// path drop new kinds of refusals, never the token entries' rows).
    fn take_side_rows(&mut self) {
        if self.batch.len() >= self.max_pending {
            return;
        }
        let taken = std::mem::take(&mut *self.side.lock().expect("audit side path"));
        for (e, row) in taken {
            self.merge(e, row);
        }
    }

    /// Adds `count` entries seen from `first` to `last` to `e`'s row (keyed without the
    /// request id; the row keeps the first one it was given).
    fn merge(
        &mut self,
        e: Entry,
        (first, last, count, request_id): (i64, i64, i64, Option<String>),
    ) {
        let slot = self.batch.entry(e).or_insert((first, last, 0, None));
        slot.0 = slot.0.min(first);
        slot.1 = slot.1.max(last);
        slot.2 += count;
        if slot.3.is_none() {
            slot.3 = request_id;
        }
    }

    fn rows(&self) -> Vec<(Entry, (i64, i64, i64))> {
        self.batch
            .iter()
            .map(|(e, (first, last, count, request_id))| {
                let mut e = e.clone();
                e.request_id.clone_from(request_id);
                (e, (*first, *last, *count))
            })
            .collect()
    }

    /// Writes the batch; on failure keeps it, says so (metrics, readiness) and backs off.
    async fn write(&mut self) -> Written {
        if self.batch.is_empty() {
            return Written::Done;
        }
        let rows = self.rows();
        match store::insert(&self.db, &rows).await {
            Ok(()) => {
                self.batch.clear();
                self.delay = Duration::from_millis(100);
                if self.retry_at.take().is_some() {
                    tracing::info!("audit writes succeed again");
                    self.metrics.database_up.set(1);
                    *self.failing.lock().expect("audit failing") = None;
                }
                Written::Done
            }
            Err(e) => {
                self.metrics.audit_write_failures.inc();
                self.metrics.database_up.set(0);
                let why = match std::error::Error::source(&e) {
                    Some(cause) => cause.to_string(),
                    None => e.to_string(),
                };
                *self.failing.lock().expect("audit failing") = Some(why);
                tracing::warn!(error = %e, rows = rows.len(), "audit write failed; entries keep coalescing until it succeeds");
                self.retry_at = Some(tokio::time::Instant::now() + self.delay);
                self.delay = (self.delay * 2).min(Duration::from_secs(5));
                Written::Refused
            }
        }
    }

    /// Shutting down with a refused batch: one last try after the backoff, then give up.
    async fn last_try(self) {
        tokio::time::sleep(self.delay).await;
        let rows = self.rows();
        if store::insert(&self.db, &rows).await.is_err() {
            tracing::error!(
                rows = rows.len(),
                "audit entries lost at shutdown: the database does not answer"
            );
        }
    }
}
