use std::collections::BTreeMap;
use std::sync::Mutex;

/// Counts API requests per operation, so tests and benchmarks can budget them.
#[derive(Debug, Default)]
pub struct CallLog {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl CallLog {
    pub fn record(&self, operation: &'static str) {
        *self.lock().entry(operation).or_default() += 1;
    }

    pub fn count(&self, operation: &str) -> u64 {
        self.lock().get(operation).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.lock().values().sum()
    }

    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.lock().clone()
    }

    pub fn reset(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        // A panic elsewhere while holding the lock leaves plain counters behind; keep counting.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}
