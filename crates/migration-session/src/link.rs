//! The link rate the source plans with, and what data costs at it: one rule for the settle
//! passes (how much may be left for the final round) and the post-copy decision (whether the
//! final round fits the budget).

/// The rate to plan with, bytes/s: round 1's rate as measured on the wire, but never above the
/// operator's cap (`max-bandwidth`); either alone when only one is known; `None` when neither is.
pub fn planning_rate(measured: Option<f64>, cap: Option<f64>) -> Option<f64> {
    match (measured, cap) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// How long `bytes` take at `rate`, in ms; infinite without a rate (nothing measured yet).
pub fn transfer_ms(bytes: u64, rate: Option<f64>) -> f64 {
    rate.filter(|r| *r > 0.0).map_or(f64::INFINITY, |r| bytes as f64 / r * 1000.0)
}

/// What fits in `budget_ms` at `rate`, in bytes (0 without a rate).
pub fn bytes_within(budget_ms: f64, rate: Option<f64>) -> u64 {
    rate.filter(|r| *r > 0.0).map_or(0, |r| (r * budget_ms / 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_rate_is_capped_and_either_stands_alone() {
        assert_eq!(planning_rate(Some(100.0), Some(40.0)), Some(40.0));
        assert_eq!(planning_rate(Some(30.0), Some(40.0)), Some(30.0));
        assert_eq!(planning_rate(None, Some(40.0)), Some(40.0));
        assert_eq!(planning_rate(Some(30.0), None), Some(30.0));
        assert_eq!(planning_rate(None, None), None);
    }

    #[test]
    fn time_and_bytes_at_a_rate() {
        assert_eq!(transfer_ms(2_500_000, Some(2_500_000.0)), 1000.0);
        assert!(transfer_ms(1, None).is_infinite());
        assert!(transfer_ms(1, Some(0.0)).is_infinite());
        assert_eq!(bytes_within(50.0, Some(2_500_000.0)), 125_000);
        assert_eq!(bytes_within(50.0, None), 0);
    }
}
