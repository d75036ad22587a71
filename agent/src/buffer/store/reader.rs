//! Reading the store beside the writer: the publisher, the SLI task and the `buffer` command.

use super::*;

/// Read access for the publisher and the `buffer` command; safe beside the writer (MVCC).
#[derive(Clone)]
pub struct Reader {
    pub(super) db: Arc<DbSlot>,
    pub(super) path: PathBuf,
    pub(super) keys: Keys,
}

impl Reader {
    /// The key of a product version's name (`{id}.v{major}`).
    pub fn key(&self, name: &str) -> ProductKey {
        self.keys.intern(name)
    }

    /// The name of a product key.
    pub fn name(&self, product: ProductKey) -> Arc<str> {
        self.keys.name(product)
    }

    /// Up to `limit` messages of `product` after `after` (from the start when `None`), in order.
    pub fn read_after(
        &self,
        product: ProductKey,
        after: Option<MessageId>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let start = after.map_or((0, 0), |a| {
            if a.seq == u64::MAX {
                (a.epoch + 1, 0)
            } else {
                (a.epoch, a.seq + 1)
            }
        });
        let mut out = Vec::new();
        for entry in table
            .range((&*name, start.0, start.1)..=(&*name, u64::MAX, u64::MAX))
            .map_err(storage(path))?
        {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(storage(path))?;
            let (_, epoch, seq) = k.value();
            let id = MessageId { epoch, seq };
            if let Some(m) = StoredMessage::decode(product, &name, id, v.value()) {
                out.push(m);
            } else {
                tracing::error!(product = %name, epoch, seq, "undecodable message in the buffer; skipping it");
            }
        }
        Ok(out)
    }

    /// The governance treatment `product` ran under when it wrote messages with `fingerprint`.
    pub fn treatment(
        &self,
        product: ProductKey,
        fingerprint: u64,
    ) -> Result<Option<crate::govern::Treatment>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = match rx.open_table(TREATMENTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(path)(e)),
        };
        let found = table.get((&*name, fingerprint)).map_err(storage(path))?;
        Ok(found.map(|v| crate::govern::Treatment::from_bytes(v.value().to_vec())))
    }

    /// The newest pending message id of `product`.
    pub fn last_id(&self, product: ProductKey) -> Result<Option<MessageId>, BufferError> {
        let path = &self.path;
        let name = self.keys.name(product);
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let last = table
            .range((&*name, 0u64, 0u64)..=(&*name, u64::MAX, u64::MAX))
            .map_err(storage(path))?
            .next_back();
        Ok(match last {
            Some(entry) => {
                let (k, _) = entry.map_err(storage(path))?;
                let (_, epoch, seq) = k.value();
                Some(MessageId { epoch, seq })
            }
            None => None,
        })
    }

    /// Products that have pending messages, in name order.
    pub fn products(&self) -> Result<Vec<ProductKey>, BufferError> {
        let path = &self.path;
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        let mut out: Vec<ProductKey> = Vec::new();
        let mut last = String::new();
        for entry in table.iter().map_err(storage(path))? {
            let (k, _) = entry.map_err(storage(path))?;
            let p = k.value().0;
            if out.is_empty() || last != p {
                out.push(self.keys.intern(p));
                last = p.to_string();
            }
        }
        Ok(out)
    }

    /// Pending gap events, oldest first.
    pub fn gaps(&self, limit: usize) -> Result<Vec<(u64, GapEvent)>, BufferError> {
        let path = &self.path;
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(GAPS).map_err(storage(path))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage(path))?.take(limit) {
            let (k, v) = entry.map_err(storage(path))?;
            if let Ok(ev) = serde_json::from_slice::<GapEvent>(v.value()) {
                out.push((k.value(), ev));
            }
        }
        Ok(out)
    }

    /// Records dropped so far, by product and reason.
    pub fn drops(&self) -> Result<Vec<(String, String, u64)>, BufferError> {
        let path = &self.path;
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(DROPS).map_err(storage(path))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage(path))? {
            let (k, v) = entry.map_err(storage(path))?;
            let (p, r) = k.value();
            out.push((p.to_string(), r.to_string(), v.value()));
        }
        Ok(out)
    }

    /// Number of pending messages in all products.
    pub fn len(&self) -> Result<u64, BufferError> {
        let path = &self.path;
        let rx = self
            .db
            .get()
            .map_err(storage(path))?
            .begin_read()
            .map_err(storage(path))?;
        let table = rx.open_table(MESSAGES).map_err(storage(path))?;
        table.len().map_err(storage(path))
    }

    pub fn is_empty(&self) -> Result<bool, BufferError> {
        Ok(self.len()? == 0)
    }
}
