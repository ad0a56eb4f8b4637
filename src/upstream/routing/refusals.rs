//! Refusals not confirmed yet: how many 401, 403 or 404 answers in a row each deployment
//! gave for each model. [`super::standing::Standing`] takes a deployment out for a model
//! only once `routing.auth_failures` of them confirm it: one alone may be a glitch (a key
//! being rotated, a provider's bad second), and taking the model out dead-letters its
//! whole backlog without a call.

use std::collections::HashMap;

/// Most (deployment, model) pairs counted at once: model names come from requests, so the
/// map is bounded. Past it a refusal is not counted (it still fails its own attempt), so a
/// flood of unknown model names delays a confirmation at worst.
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
    /// `None` when the map is full: not counted.
    pub(super) fn count(&mut self, d: usize, model: &str, now: i64, window: i64) -> Option<u32> {
        let key = (d, model.to_string());
        if !self.runs.contains_key(&key) {
            self.runs.retain(|_, (_, last)| now - *last < window);
            if self.runs.len() >= MAX_PAIRS {
                return None;
            }
        }
        let (count, last) = self.runs.entry(key).or_insert((0, now));
        if now - *last >= window {
            *count = 0;
        }
        *count = count.saturating_add(1);
        *last = now;
        Some(*count)
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
        let confirmed = self.count(d, model, now, window) >= Some(needed);
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
        assert_eq!(r.count(0, "m", 0, 100), Some(1));
        assert_eq!(r.count(0, "m", 10, 100), Some(2));
        assert_eq!(r.count(0, "n", 10, 100), Some(1), "another model");
        assert_eq!(r.count(1, "m", 10, 100), Some(1), "another deployment");
        r.clear(0, "m");
        assert_eq!(
            r.count(0, "m", 20, 100),
            Some(1),
            "an answer between ends the run"
        );
        assert_eq!(
            r.count(0, "m", 120, 100),
            Some(1),
            "a stale run starts again"
        );
        assert!(!r.confirms(0, "m", 130, 100, 3));
        assert!(r.confirms(0, "m", 140, 100, 3), "the third in a row");
        assert_eq!(
            r.count(0, "m", 150, 100),
            Some(1),
            "a confirmed run is over"
        );
    }

    #[test]
    fn the_map_is_bounded_and_stale_runs_make_room() {
        let mut r = Refusals::default();
        for i in 0..MAX_PAIRS {
            assert_eq!(r.count(0, &format!("m{i}"), 0, 100), Some(1));
        }
        assert_eq!(r.count(0, "one-more", 50, 100), None, "full: not counted");
        assert_eq!(
            r.count(0, "m0", 50, 100),
            Some(2),
            "runs already counted go on"
        );
        assert_eq!(
            r.count(0, "one-more", 100, 100),
            Some(1),
            "the stale ones left"
        );
        assert!(r.runs.len() <= 2, "{}", r.runs.len());
    }
}
