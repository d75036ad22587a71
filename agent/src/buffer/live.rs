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
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    products: HashMap<ProductKey, Queue>,
    /// Products staged to since the publisher last asked ([`Live::take_fresh`]): it visits these,
    /// not every product (cost by the data, not by the product count).
    fresh: Vec<ProductKey>,
}

#[derive(Default)]
struct Queue {
    /// Numbered and not yet committed nor acknowledged, in id order.
    staged: VecDeque<Arc<StoredMessage>>,
    /// The newest id committed in this run.
    committed: Option<MessageId>,
    /// In [`Inner::fresh`].
    fresh: bool,
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map whole (every change is one push or remove).
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Messages just numbered, each after the last staged of its product.
    pub(super) fn stage(&self, msgs: Vec<Arc<StoredMessage>>) {
        if msgs.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let Inner { products, fresh } = &mut *inner;
        for m in msgs {
            let product = m.product;
            let q = products.entry(product).or_default();
            q.staged.push_back(m);
            if !q.fresh {
                q.fresh = true;
                fresh.push(product);
            }
        }
    }

    /// The products staged to since the last call, each once.
    pub fn take_fresh(&self) -> Vec<ProductKey> {
        let mut inner = self.lock();
        let Inner { products, fresh } = &mut *inner;
        for p in fresh.iter() {
            if let Some(q) = products.get_mut(p) {
                q.fresh = false;
            }
        }
        std::mem::take(fresh)
    }

    /// Messages acknowledged before their commit: never written.
    pub(super) fn unstage(&self, ids: &[(ProductKey, MessageId)]) {
        if ids.is_empty() {
            return;
        }
        let mut inner = self.lock();
        for &(product, id) in ids {
            if let Some(q) = inner.products.get_mut(&product) {
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
        let mut inner = self.lock();
        for &(product, id) in through {
            let q = inner.products.entry(product).or_default();
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
        let inner = self.lock();
        let Some(q) = inner.products.get(&product) else {
            return (Vec::new(), false);
        };
        let start = q.staged.partition_point(|m| Some(m.id) <= after);
        let staged = q.staged.iter().skip(start).take(limit).cloned().collect();
        (staged, q.committed > after)
    }

    /// Messages staged now, all products.
    pub fn staged(&self) -> usize {
        self.lock().products.values().map(|q| q.staged.len()).sum()
    }
}
