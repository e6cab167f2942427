//! Which writer takes a message: the one that owns its device.

use std::sync::Arc;

use super::queue::Queue;
use crate::work::Job;

/// Hands each update to a writer chosen by its device, so that one device's messages stay in
/// order (one writer, one queue) and no two writers ever lock the same row. Device ids are
/// compared without ASCII case, as the database's usual collations do.
#[derive(Debug, Clone)]
pub struct Router {
    writers: Vec<Arc<Queue>>,
}

impl Router {
    /// A router over the writers' queues (at least one).
    pub fn new(writers: Vec<Arc<Queue>>) -> Self {
        assert!(!writers.is_empty(), "at least one writer");
        Self { writers }
    }

    /// Queues `job` for its device's writer; waits while that queue is full. Gives the job
    /// back if the writer has stopped taking messages (shutdown).
    pub async fn send(&self, job: Job) -> Result<(), Job> {
        let hash = folded_hash(job.update.device.as_str());
        let queue = &self.writers[writer_of(hash, self.writers.len())];
        queue.send(job, hash).await
    }

    /// Wakes every writer that waits for its batch to fill: nothing more is coming.
    pub fn wake(&self) {
        for q in &self.writers {
            q.ready.notify_one();
        }
    }

    /// A handle that measures how full the writers' queues are, for `/metrics`.
    pub fn depth_probe(&self) -> QueueDepth {
        QueueDepth {
            queues: self.writers.clone(),
        }
    }
}

/// Measures the writers' queues.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    queues: Vec<Arc<Queue>>,
}

impl QueueDepth {
    /// Parsed updates waiting in all the queues together, and their total capacity.
    pub fn current(&self) -> (usize, usize) {
        self.queues.iter().fold((0, 0), |(depth, cap), q| {
            (depth + q.updates(), cap + q.capacity)
        })
    }
}

/// FNV-1a over the ASCII-lower-cased id: picks the writer and keys the device's entry.
pub(super) fn folded_hash(device: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in device.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Which of `n` writers takes the device whose [`folded_hash`] is `hash`.
fn writer_of(hash: u64, n: usize) -> usize {
    (hash % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(device: &str, n: usize) -> usize {
        writer_of(folded_hash(device), n)
    }

    #[test]
    fn shards_ignore_case_and_spread() {
        assert_eq!(shard("AB:CD", 4), shard("ab:cd", 4));
        assert_eq!(shard("x", 1), 0);
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            counts[shard(&format!("dev{i}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
