//! The one call a half-open circuit breaker lets through, out until its answer settles it.

use super::standing::Standing;

/// A probe taken from [`Standing::check`]. Dropped before its answer settles it (shutdown,
/// no slot in time, a cancel or a deadline dropping the call mid-way), it gives the probe
/// back at once, so that the next call probes instead of the deployment waiting for a probe
/// that will never report.
pub(super) struct ProbeGuard<'a> {
    standing: &'a Standing,
    d: usize,
    settled: bool,
}

impl<'a> ProbeGuard<'a> {
    /// The probe of deployment `d`, just taken.
    pub(super) fn new(standing: &'a Standing, d: usize) -> Self {
        Self {
            standing,
            d,
            settled: false,
        }
    }

    /// The call got an answer, which the caller reports (`succeeded`, `answered` or
    /// `failed`).
    pub(super) fn settled(mut self) {
        self.settled = true;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.standing.probe_abandoned(self.d);
        }
    }
}
