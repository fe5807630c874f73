//! Ordering of overlapping writes.
//!
//! Two writes to the same blocks that are in flight at once may reach the replicas in
//! different orders, leaving them with different data (and reads, which rotate between
//! replicas, flipping between the two). The NBD client may pick either outcome, but every
//! replica must have the same one. So a write waits while an earlier in-flight write overlaps
//! it; writes to other blocks never wait. Ranges are widened to whole 4 KiB blocks, the unit in
//! which replicas read-modify-write.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

const BLOCK: u64 = 4096;

struct Entry {
    id: u64,
    range: Range<u64>,
    /// Created by the first writer that has to wait; closed when this write ends.
    done: Option<Arc<Semaphore>>,
}

/// The in-flight writes of a volume.
#[derive(Default)]
pub struct InFlight {
    inner: Mutex<(u64, Vec<Entry>)>,
}

/// Held while a write is in flight; dropping it lets overlapping writes go.
pub struct RangeGuard<'a> {
    owner: &'a InFlight,
    id: u64,
}

impl InFlight {
    /// Waits until no in-flight write overlaps `[offset, offset + len)`, then registers this
    /// one.
    pub async fn acquire(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let range = offset - offset % BLOCK..(offset + len).next_multiple_of(BLOCK);
        loop {
            let wait = {
                let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                let (next_id, entries) = &mut *g;
                match entries
                    .iter_mut()
                    .find(|e| e.range.start < range.end && range.start < e.range.end)
                {
                    Some(e) => e
                        .done
                        .get_or_insert_with(|| Arc::new(Semaphore::new(0)))
                        .clone(),
                    None => {
                        let id = *next_id;
                        *next_id += 1;
                        entries.push(Entry {
                            id,
                            range,
                            done: None,
                        });
                        return RangeGuard { owner: self, id };
                    }
                }
            };
            // Closed (never given permits) when the overlapping write ends, also if that
            // happened before this line: no lost wake-up.
            let _ = wait.acquire().await;
        }
    }

    /// Writes in flight now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).1.len()
    }

    /// Whether no write is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut g = self.owner.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pos) = g.1.iter().position(|e| e.id == self.id) {
            let e = g.1.swap_remove(pos);
            if let Some(done) = e.done {
                done.close();
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_writes_wait_and_others_do_not() {
        let f = Arc::new(InFlight::default());
        let a = f.acquire(0, 4096).await;
        // Other blocks: no wait.
        let b = f.acquire(8192, 512).await;
        assert_eq!(f.len(), 2);
        // Same block, other sector: waits for `a`.
        let f2 = f.clone();
        let waiter = tokio::spawn(async move {
            let _g = f2.acquire(1024, 512).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        drop(b);
        assert!(f.is_empty());
    }
}
