//! Jittered exponential backoff ("full jitter"): each wait is uniform in [min, cap], where the cap
//! doubles from `min` up to `max` with every failure, so a plant full of gateways does not reconnect in
//! lock step after a broker or network outage.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next wait; grows with every call until [`Backoff::reset`].
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.min.saturating_mul(1u32 << self.attempt.min(20)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = cap.saturating_sub(self.min).as_millis() as u64;
        self.min + Duration::from_millis(if span == 0 { 0 } else { fastrand::u64(0..=span) })
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let mut caps = Vec::new();
        for i in 0..10 {
            let d = b.next_delay();
            assert!(d >= min && d <= max, "{d:?}");
            caps.push((min * (1 << i)).min(max));
            assert!(d <= caps[i]);
        }
        b.reset();
        assert_eq!(b.next_delay(), min);
    }
}
