//! The products a fill visits: those with something to send, in turn, each once.
//!
//! A fill takes products from the front, as many as the in-flight window has room for, and puts
//! back at the end those with more to send; a product read to its end leaves until new messages
//! mark it again. So a fill costs what it sends, however many products there are.

use crate::buffer::ProductKey;
use std::collections::{HashSet, VecDeque};

#[derive(Default)]
pub struct Visits {
    order: VecDeque<ProductKey>,
    member: HashSet<ProductKey>,
}

impl Visits {
    /// Marks `product` to be visited (once, however often it is marked).
    pub fn mark(&mut self, product: ProductKey) {
        if self.member.insert(product) {
            self.order.push_back(product);
        }
    }

    /// The next product to visit; it must be put [`back`](Visits::back) or [`leave`](Visits::leave).
    pub fn next(&mut self) -> Option<ProductKey> {
        self.order.pop_front()
    }

    /// Visited, with more to send: after the others.
    pub fn back(&mut self, product: ProductKey) {
        self.order.push_back(product);
    }

    /// Visited, nothing more to send until it is marked again.
    pub fn leave(&mut self, product: ProductKey) {
        self.member.remove(&product);
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_product_once_in_turn_until_it_leaves() {
        let table = crate::buffer::Keys::default();
        let keys: Vec<ProductKey> = ["a", "b", "c"].iter().map(|n| table.intern(n)).collect();
        let mut v = Visits::default();
        for k in [keys[0], keys[1], keys[0], keys[2]] {
            v.mark(k);
        }
        assert_eq!(v.len(), 3, "marked twice, visited once");
        let a = v.next().unwrap();
        v.back(a);
        let b = v.next().unwrap();
        v.leave(b);
        assert_eq!((a, b), (keys[0], keys[1]));
        assert_eq!(v.next(), Some(keys[2]));
        v.leave(keys[2]);
        assert_eq!(v.next(), Some(keys[0]), "the one put back comes round again");
        v.leave(keys[0]);
        assert_eq!(v.len(), 0);
        v.mark(keys[1]);
        assert_eq!(v.next(), Some(keys[1]), "a product that left comes back when marked");
    }
}
