//! What `/_/stats` shows of each live worker, readable while a request owns the worker.
//!
//! A busy worker's store belongs to the task running its request, so the stats cannot ask the store. Instead each
//! worker carries a [`WorkerStatus`] of relaxed atomics that the pool updates as the worker is lent and given back,
//! and that the store's resource limiter updates as the guest's memory grows. The [`WorkerTable`] lists them; a
//! worker is in it from its creation until it is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::{ResourceLimiter, StoreLimits};

use crate::backends::wasm::worker::Identity;

/// One worker, as the stats see it.
#[derive(Debug)]
pub(crate) struct WorkerStatus {
    pub(crate) id: u64,
    pub(crate) identity: Identity,
    pub(crate) created: Instant,
    busy: AtomicBool,
    requests: AtomicU64,
    /// When it last finished a request, in microseconds after `created` (0: never).
    last_used_us: AtomicU64,
    /// Linear memory the guest holds, in bytes.
    memory_bytes: AtomicU64,
}

/// A worker's status read at one moment.
#[derive(Debug, Clone)]
pub(crate) struct WorkerReading {
    pub(crate) id: u64,
    pub(crate) app: String,
    pub(crate) version: String,
    pub(crate) busy: bool,
    pub(crate) age_ms: u64,
    pub(crate) idle_ms: u64,
    pub(crate) requests: u64,
    pub(crate) memory_bytes: u64,
}

impl WorkerStatus {
    pub(crate) fn new(id: u64, identity: Identity, created: Instant) -> WorkerStatus {
        WorkerStatus {
            id,
            identity,
            created,
            busy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            last_used_us: AtomicU64::new(0),
            memory_bytes: AtomicU64::new(0),
        }
    }

    /// The worker was lent to a request.
    pub(crate) fn lent(&self) {
        self.busy.store(true, Ordering::Relaxed);
    }

    /// The worker finished a request (`served` in all) at `now`.
    pub(crate) fn finished(&self, served: u64, now: Instant) {
        self.requests.store(served, Ordering::Relaxed);
        let since = now.saturating_duration_since(self.created).as_micros();
        self.last_used_us
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.busy.store(false, Ordering::Relaxed);
    }

    /// Requests finished so far.
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// When it last finished a request (its creation, if it never has).
    pub(crate) fn last_used(&self) -> Instant {
        self.created + std::time::Duration::from_micros(self.last_used_us.load(Ordering::Relaxed))
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn read(&self, now: Instant) -> WorkerReading {
        let age = now.saturating_duration_since(self.created);
        let busy = self.busy.load(Ordering::Relaxed);
        let last_used_us = self.last_used_us.load(Ordering::Relaxed);
        let idle_ms = if busy {
            0
        } else {
            (age.as_micros() as u64).saturating_sub(last_used_us) / 1000
        };
        WorkerReading {
            id: self.id,
            app: self.identity.app.clone(),
            version: self.identity.version.clone(),
            busy,
            age_ms: age.as_millis() as u64,
            idle_ms,
            requests: self.requests.load(Ordering::Relaxed),
            memory_bytes: self.memory_bytes(),
        }
    }
}

/// Shards of the [`WorkerTable`]: with a fresh worker per request (`ttl: 0`) every request adds and removes one, so
/// the table is split for those locks not to be one the whole server contends on.
const SHARDS: usize = 16;

/// Every live worker's status.
#[derive(Debug, Default)]
pub(crate) struct WorkerTable {
    shards: [Mutex<HashMap<u64, Arc<WorkerStatus>>>; SHARDS],
}

impl WorkerTable {
    /// Lists `status` until the returned registration is dropped (with its worker).
    pub(crate) fn register(self: &Arc<Self>, status: Arc<WorkerStatus>) -> Registration {
        let id = status.id;
        self.shard(id).insert(id, status);
        Registration {
            table: self.clone(),
            id,
        }
    }

    /// Every live worker, by id.
    pub(crate) fn read(&self, now: Instant) -> Vec<WorkerReading> {
        let mut readings: Vec<WorkerReading> = (0..SHARDS as u64)
            .flat_map(|shard| {
                let workers = self.shard(shard);
                workers.values().map(|status| status.read(now)).collect::<Vec<_>>()
            })
            .collect();
        readings.sort_by_key(|reading| reading.id);
        readings
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<WorkerStatus>>> {
        self.shards[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A worker's place in the [`WorkerTable`]; dropping it takes the worker off the list.
#[derive(Debug)]
pub(crate) struct Registration {
    table: Arc<WorkerTable>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.shard(self.id).remove(&self.id);
    }
}

/// The store's resource limiter: the memory cap, plus a running count of the linear memory it allowed.
///
/// What it allows is what the guest gets: growth past the memory's declared maximum is refused here (by
/// `StoreLimits`), and a pooled slot reserves the largest cap a config may set, so wasmtime does not fail a growth
/// after it was allowed (short of the OS failing to map memory, which is not taken back).
pub(crate) struct MeteredLimits {
    limits: StoreLimits,
    status: Arc<WorkerStatus>,
}

impl MeteredLimits {
    pub(crate) fn new(limits: StoreLimits, status: Arc<WorkerStatus>) -> MeteredLimits {
        MeteredLimits { limits, status }
    }
}

impl ResourceLimiter for MeteredLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let allowed = self.limits.memory_growing(current, desired, maximum)?;
        if allowed {
            let grown = desired.saturating_sub(current) as u64;
            self.status.memory_bytes.fetch_add(grown, Ordering::Relaxed);
        }
        Ok(allowed)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.limits.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64) -> Arc<WorkerStatus> {
        let identity = Identity {
            app: "hello".into(),
            version: "1.0.0".into(),
        };
        Arc::new(WorkerStatus::new(id, identity, Instant::now()))
    }

    #[test]
    fn a_worker_is_listed_until_its_registration_drops() {
        let table = Arc::new(WorkerTable::default());
        let first = table.register(status(2));
        let second = table.register(status(1));
        let third = table.register(status(17));
        let ids: Vec<u64> = table.read(Instant::now()).iter().map(|w| w.id).collect();
        assert_eq!(ids, [1, 2, 17]);
        drop(third);
        drop(first);
        drop(second);
        assert!(table.read(Instant::now()).is_empty());
    }

    #[test]
    fn an_idle_worker_reports_how_long_since_its_last_request() {
        let status = status(1);
        let later = status.created + std::time::Duration::from_millis(300);
        assert_eq!(status.read(later).idle_ms, 0, "busy from creation");
        status.finished(1, status.created + std::time::Duration::from_millis(100));
        let reading = status.read(later);
        assert!(!reading.busy);
        assert_eq!((reading.age_ms, reading.idle_ms, reading.requests), (300, 200, 1));
    }

    #[test]
    fn allowed_memory_growth_is_counted_and_refused_growth_is_not() {
        let status = status(1);
        let limits = wasmtime::StoreLimitsBuilder::new().memory_size(1 << 20).build();
        let mut limits = MeteredLimits::new(limits, status.clone());
        assert!(limits.memory_growing(0, 65536, None).unwrap());
        assert!(!limits.memory_growing(65536, 2 << 20, None).unwrap());
        assert_eq!(status.memory_bytes(), 65536);
        // Within the cap but past the memory's own declared maximum: refused, so not counted.
        assert!(!limits.memory_growing(65536, 131072, Some(65536)).unwrap());
        assert_eq!(status.memory_bytes(), 65536);
    }
}
