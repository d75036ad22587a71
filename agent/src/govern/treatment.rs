//! What governance did to a product's fields when a message was written, so that a message
//! buffered under older rules is never sent with a weaker treatment than today's rules give.
//!
//! A [`Treatment`] is the action of every field of a product version, in contract order, as bytes
//! (name, action, step). The buffer keeps each treatment a product has run under (keyed by its
//! fingerprint) and stamps every message with the fingerprint of the treatment it was governed
//! under. Just before publishing, a message whose treatment is not today's is sent only when its
//! treatment [`covers`](Treatment::covers) today's: every field it carries was treated at least as
//! strictly as today's rules treat it. Otherwise it is dead-lettered with `governance_changed`.

use crate::config::{fnv1a64, EdgeAction, ProductPlan};

/// The treatment of a product's fields, encoded (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Treatment {
    bytes: Vec<u8>,
    fingerprint: u64,
}

/// Fingerprint of messages whose treatment is not known (written before messages carried one).
pub const UNKNOWN: u64 = 0;

impl Treatment {
    /// The treatment `plan` gives its fields now.
    pub fn of(plan: &ProductPlan) -> Treatment {
        Treatment::from_actions(plan.fields.iter().map(|f| (f.name.as_str(), f.action)))
    }

    pub fn from_actions<'a>(fields: impl IntoIterator<Item = (&'a str, EdgeAction)>) -> Treatment {
        let mut bytes = vec![1u8]; // format version
        for (name, action) in fields {
            let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
            bytes.extend((name.len() as u16).to_le_bytes());
            bytes.extend(name);
            bytes.push(action.rank());
            let step = match action {
                EdgeAction::Coarsen(s) => s,
                _ => 0.0,
            };
            bytes.extend(step.to_le_bytes());
        }
        Treatment::from_bytes(bytes)
    }

    /// A treatment as the buffer stored it.
    pub fn from_bytes(bytes: Vec<u8>) -> Treatment {
        // Never `UNKNOWN`: that one means "not known".
        let fingerprint = fnv1a64(&[&bytes]).max(1);
        Treatment { bytes, fingerprint }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// `(field, action)` of each field; `None` for bytes this build cannot read.
    pub fn fields(&self) -> Option<Vec<(&str, EdgeAction)>> {
        let b = &self.bytes;
        if b.first() != Some(&1) {
            return None;
        }
        let mut out = Vec::new();
        let mut i = 1;
        while i < b.len() {
            let len = usize::from(u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?));
            let name = std::str::from_utf8(b.get(i + 2..i + 2 + len)?).ok()?;
            i += 2 + len;
            let rank = *b.get(i)?;
            let step = f64::from_le_bytes(b.get(i + 1..i + 9)?.try_into().ok()?);
            i += 9;
            let action = match rank {
                0 => EdgeAction::Pass,
                1 => EdgeAction::Coarsen(step),
                2 => EdgeAction::Pseudonymise,
                3 => EdgeAction::Mask,
                4 => EdgeAction::Never,
                _ => return None,
            };
            out.push((name, action));
        }
        Some(out)
    }

    /// True when a message governed under `self` may be sent under `now`: every field `self` let
    /// out in any form is one `now` still has, and `self` treated it at least as strictly as `now`
    /// does. A field `now` does not have leaves only if `self` withheld it (`never`).
    pub fn covers(&self, now: &Treatment) -> bool {
        if self.fingerprint == now.fingerprint && self.bytes == now.bytes {
            return true;
        }
        let (Some(then), Some(now)) = (self.fields(), now.fields()) else {
            return false;
        };
        then.iter()
            .all(|&(name, was)| match now.iter().find(|(n, _)| *n == name) {
                Some(&(_, is)) => was.at_least(is),
                None => was == EdgeAction::Never,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use EdgeAction::*;

    fn t(fields: &[(&str, EdgeAction)]) -> Treatment {
        Treatment::from_actions(fields.iter().copied())
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let a = t(&[("temp", Coarsen(0.5)), ("badge", Pseudonymise), ("recipe", Never)]);
        assert_eq!(
            a.fields(),
            Some(vec![("temp", Coarsen(0.5)), ("badge", Pseudonymise), ("recipe", Never)])
        );
        assert_eq!(Treatment::from_bytes(a.bytes().to_vec()), a);
        assert_ne!(a.fingerprint(), UNKNOWN);
    }

    #[test]
    fn a_message_goes_only_if_it_was_treated_at_least_as_strictly_as_now() {
        let then = t(&[("temp", Pass), ("badge", Pseudonymise)]);
        assert!(then.covers(&then));
        // Tightened: the old message carries the value in a weaker form.
        assert!(!then.covers(&t(&[("temp", Never), ("badge", Pseudonymise)])));
        assert!(!then.covers(&t(&[("temp", Coarsen(1.0)), ("badge", Pseudonymise)])));
        assert!(!then.covers(&t(&[("temp", Pass), ("badge", Mask)])));
        // Loosened: what was sent then is stricter than now requires.
        let strict = t(&[("temp", Coarsen(10.0)), ("badge", Never)]);
        assert!(strict.covers(&t(&[("temp", Coarsen(5.0)), ("badge", Pass)])));
        assert!(!strict.covers(&t(&[("temp", Coarsen(3.0)), ("badge", Pass)])));
        // A field added since: old messages do not carry it.
        assert!(then.covers(&t(&[("temp", Pass), ("badge", Pseudonymise), ("new", Pass)])));
        // A field gone since: only if it never left.
        assert!(!then.covers(&t(&[("temp", Pass)])));
        assert!(t(&[("temp", Pass), ("recipe", Never)]).covers(&t(&[("temp", Pass)])));
    }

    #[test]
    fn unreadable_bytes_cover_nothing() {
        let now = t(&[("temp", Pass)]);
        assert!(!Treatment::from_bytes(vec![9, 1, 2]).covers(&now));
        assert!(!Treatment::from_bytes(vec![1, 4, 0, b'a']).covers(&now));
    }
}
