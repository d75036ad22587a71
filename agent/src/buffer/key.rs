//! Product identity inside the agent: one small `Copy` key per product version.
//!
//! The buffer file keys messages by the product version's name, `{id}.v{major}` (it must: the file
//! outlives any config, and holds products a config may since have removed). Everything in memory
//! (the store's accounting, acknowledgements, the publisher's in-flight table and cursors) uses a
//! [`ProductKey`] instead: the name's index in one [`Keys`] table that the store and every reader
//! share. A key is handed out once per name and never reused, so it is stable for the life of the
//! process.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

/// A product version (`{id}.v{major}`), as the buffer, its acknowledgements and the publisher know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProductKey(u32);

#[derive(Debug, Default)]
struct Table {
    names: Vec<Arc<str>>,
    by_name: HashMap<Arc<str>, ProductKey>,
}

/// The names behind the keys, shared by the store and its readers. Names are added (a product of the
/// config, or one found in the file), never removed.
#[derive(Debug, Clone, Default)]
pub struct Keys(Arc<RwLock<Table>>);

impl Keys {
    /// The key of `name`, handed out now if the name is new.
    pub fn intern(&self, name: &str) -> ProductKey {
        if let Some(k) = self.get(name) {
            return k;
        }
        let mut t = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(&k) = t.by_name.get(name) {
            return k;
        }
        let key = ProductKey(t.names.len() as u32);
        let name: Arc<str> = name.into();
        t.names.push(name.clone());
        t.by_name.insert(name, key);
        key
    }

    /// The key of `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<ProductKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .by_name
            .get(name)
            .copied()
    }

    /// The name of a key this table handed out (empty for any other).
    pub fn name(&self, key: ProductKey) -> Arc<str> {
        let t = self.0.read().unwrap_or_else(PoisonError::into_inner);
        t.names.get(key.0 as usize).cloned().unwrap_or_else(|| "".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_keeps_its_key_and_keys_are_never_reused() {
        let keys = Keys::default();
        let a = keys.intern("press.v1");
        let b = keys.intern("oven.v2");
        assert_ne!(a, b);
        assert_eq!(keys.intern("press.v1"), a);
        assert_eq!(keys.clone().get("oven.v2"), Some(b));
        assert_eq!(&*keys.name(a), "press.v1");
        assert_eq!(keys.get("missing"), None);
    }
}
