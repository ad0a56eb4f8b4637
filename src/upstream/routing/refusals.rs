//! Refusals not confirmed yet: how many 401, 403 or 404 answers in a row each deployment
//! gave for each model. [`super::standing::Standing`] takes a deployment out for a model
//! only once `routing.auth_failures` of them confirm it: one alone may be a glitch (a key
//! being rotated, a provider's bad second), and taking the model out dead-letters its
//! whole backlog without a call.

use std::collections::HashMap;

/// Most (deployment, model) pairs counted at once: model names come from requests, so the
/// map is bounded. Past it a new run takes the place of the one refused longest ago, so a
/// flood of made-up model names, each refused once, cannot keep a real model's refusals
/// from being counted.
const MAX_PAIRS: usize = 1024;

/// The runs of refusals, by deployment and model.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// (deployment, model) -> refusals in a row, and the last one's time (Unix ms).
    runs: HashMap<(usize, String), (u32, i64)>,
}

impl Refusals {
    /// Counts a refusal of `model` by `d` at `now`; answers the refusals in a row so far. A
    /// run whose last refusal is `window` ms old or more is over: this one starts another.
    pub(super) fn count(&mut self, d: usize, model: &str, now: i64, window: i64) -> u32 {
        let key = (d, model.to_string());
        if !self.runs.contains_key(&key) {
            self.runs.retain(|_, (_, last)| now - *last < window);
            if self.runs.len() >= MAX_PAIRS {
                let oldest = self.runs.iter().min_by_key(|(_, (_, last))| *last);
                if let Some(oldest) = oldest.map(|(key, _)| key.clone()) {
                    self.runs.remove(&oldest);
                }
            }
        }
        let (count, last) = self.runs.entry(key).or_insert((0, now));
        if now - *last >= window {
            *count = 0;
        }
        *count = count.saturating_add(1);
        *last = now;
        *count
    }

    /// Counts a refusal of `model` by `d` at `now` (as [`Self::count`]); answers whether it
    /// is the `needed`-th in a row, which ends the run.
    pub(super) fn confirms(
        &mut self,
        d: usize,
        model: &str,
        now: i64,
        window: i64,
        needed: u32,
    ) -> bool {
        let confirmed = self.count(d, model, now, window) >= needed;
        if confirmed {
            self.clear(d, model);
        }
        confirmed
    }

    /// Ends the run of `d` for `model`: it gave another answer, or the run confirmed it.
    pub(super) fn clear(&mut self, d: usize, model: &str) {
        if !self.runs.is_empty() {
            self.runs.remove(&(d, model.to_string()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_count_in_a_row_per_deployment_and_model_until_cleared_or_stale() {
        let mut r = Refusals::default();
        assert_eq!(r.count(0, "m", 0, 100), 1);
        assert_eq!(r.count(0, "m", 10, 100), 2);
        assert_eq!(r.count(0, "n", 10, 100), 1, "another model");
        assert_eq!(r.count(1, "m", 10, 100), 1, "another deployment");
        r.clear(0, "m");
        assert_eq!(
            r.count(0, "m", 20, 100),
            1,
            "an answer between ends the run"
        );
        assert_eq!(r.count(0, "m", 120, 100), 1, "a stale run starts again");
        assert!(!r.confirms(0, "m", 130, 100, 3));
        assert!(r.confirms(0, "m", 140, 100, 3), "the third in a row");
        assert_eq!(r.count(0, "m", 150, 100), 1, "a confirmed run is over");
    }

    #[test]
    fn the_map_is_bounded_and_a_flood_cannot_keep_a_real_model_from_being_counted() {
        let mut r = Refusals::default();
        assert_eq!(r.count(0, "real", 0, 1_000), 1);
        for i in 0..10 * MAX_PAIRS {
            let now = 1 + i as i64 / 100;
            r.count(0, &format!("made-up-{i}"), now, 1_000);
            if i % 500 == 0 {
                // The real model is refused again now and then: its run goes on.
                r.count(0, "real", now, 1_000);
            }
        }
        assert!(r.runs.len() <= MAX_PAIRS, "{}", r.runs.len());
        assert_eq!(
            r.count(0, "real", 200, 1_000),
            2 + (10 * MAX_PAIRS as u32 - 1) / 500 + 1,
            "counted all along"
        );
        assert_eq!(r.count(0, "made-up-0", 200, 1_000), 1, "pushed out");
    }
}
