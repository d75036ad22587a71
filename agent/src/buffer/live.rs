//! Live messages: numbered by the writer and readable by the publisher before they are committed.
//!
//! The writer stages every message it numbers here and the publisher sends it at once; a message
//! acknowledged before its commit is due leaves without ever being written. What is still here
//! when the commit is due is committed, and from then on read from redb like any buffered message.
//!
//! One lock keeps the two views consistent: the writer removes committed messages and records
//! that they are committed in one step, after the commit has returned, and the publisher reads the
//! staged messages and whether redb holds newer ones in one step. So a reader never sees a
//! message in neither place.

use super::{MessageId, ProductKey, StoredMessage};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
pub struct Live {
    products: Mutex<HashMap<ProductKey, Queue>>,
}

#[derive(Default)]
struct Queue {
    /// Numbered and not yet committed nor acknowledged, in id order.
    staged: VecDeque<Arc<StoredMessage>>,
    /// The newest id committed in this run.
    committed: Option<MessageId>,
}

impl Queue {
    fn latest(&self) -> Option<MessageId> {
        self.staged.back().map(|m| m.id).max(self.committed)
    }
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, HashMap<ProductKey, Queue>> {
        // A panic while holding the lock leaves the map whole (every change is one push or remove).
        self.products.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Messages just numbered, each after the last staged of its product.
    pub(super) fn stage(&self, msgs: Vec<Arc<StoredMessage>>) {
        if msgs.is_empty() {
            return;
        }
        let mut products = self.lock();
        for m in msgs {
            products.entry(m.product).or_default().staged.push_back(m);
        }
    }

    /// Messages acknowledged before their commit: never written.
    pub(super) fn unstage(&self, ids: &[(ProductKey, MessageId)]) {
        if ids.is_empty() {
            return;
        }
        let mut products = self.lock();
        for &(product, id) in ids {
            if let Some(q) = products.get_mut(&product) {
                // Acknowledgements come mostly in order: the front, or close to it.
                if let Ok(i) = q.staged.binary_search_by_key(&id, |m| m.id) {
                    q.staged.remove(i);
                }
            }
        }
    }

    /// After a commit has returned: these messages are in redb now (or were dropped there and are
    /// covered by gap events), up to `through` per product.
    pub(super) fn committed(&self, through: &[(ProductKey, MessageId)]) {
        let mut products = self.lock();
        for &(product, id) in through {
            let q = products.entry(product).or_default();
            while q.staged.front().is_some_and(|m| m.id <= id) {
                q.staged.pop_front();
            }
            q.committed = q.committed.max(Some(id));
        }
    }

    /// Up to `limit` staged messages of `product` after `after`, and whether redb holds messages
    /// after `after` committed in this run (read those first: they are older).
    pub fn after(
        &self,
        product: ProductKey,
        after: Option<MessageId>,
        limit: usize,
    ) -> (Vec<Arc<StoredMessage>>, bool) {
        let products = self.lock();
        let Some(q) = products.get(&product) else {
            return (Vec::new(), false);
        };
        let start = q.staged.partition_point(|m| Some(m.id) <= after);
        let staged = q.staged.iter().skip(start).take(limit).cloned().collect();
        (staged, q.committed > after)
    }

    /// Of `cursors` (product, last id read), the products with newer messages, staged or committed.
    pub fn newer<'a>(&self, cursors: impl Iterator<Item = (&'a ProductKey, Option<MessageId>)>) -> Vec<ProductKey> {
        let products = self.lock();
        cursors
            .filter(|(p, after)| products.get(p).is_some_and(|q| q.latest() > *after))
            .map(|(p, _)| *p)
            .collect()
    }

    /// Messages staged now, all products.
    pub fn staged(&self) -> usize {
        self.lock().values().map(|q| q.staged.len()).sum()
    }
}
