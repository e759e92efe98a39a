//! The link rate the source plans with, and what data costs at it: one rule for the settle
//! passes (how much may be left for the final round) and the post-copy decision (whether the
//! final round fits the budget).

use crate::phase::PostcopyMode;

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

/// Why the final round leaves its `data_blocks` for after the switchover, or `None` when it
/// sends them itself: `Never` never, `Always` whenever there is data, `Auto` when the round
/// would take longer than the budget at the planning rate (`predicted_ms`; infinite when no rate
/// is known yet, which no budget fits).
pub fn postcopy_reason(
    mode: PostcopyMode,
    data_blocks: u64,
    predicted_ms: f64,
    budget_ms: Option<u64>,
) -> Option<String> {
    if data_blocks == 0 {
        return None;
    }
    match mode {
        PostcopyMode::Never => None,
        PostcopyMode::Always => Some("postcopy: always".to_string()),
        PostcopyMode::Auto => match budget_ms {
            Some(b) if predicted_ms.is_infinite() => {
                Some(format!("no link rate is known to fit the final round in the {b} ms budget"))
            }
            Some(b) if predicted_ms > b as f64 => Some(format!(
                "the final round would take {predicted_ms:.0} ms at the measured rate, over the {b} ms budget"
            )),
            _ => None,
        },
    }
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

    #[test]
    fn postcopy_only_with_data_and_as_the_mode_says() {
        assert_eq!(postcopy_reason(PostcopyMode::Always, 0, 10.0, Some(1)), None);
        assert_eq!(postcopy_reason(PostcopyMode::Always, 3, 0.0, None).as_deref(), Some("postcopy: always"));
        assert_eq!(postcopy_reason(PostcopyMode::Never, 3, 1e9, Some(1)), None);
    }

    #[test]
    fn auto_leaves_the_data_only_over_the_budget() {
        assert_eq!(postcopy_reason(PostcopyMode::Auto, 3, 300.0, Some(300)), None);
        let why = postcopy_reason(PostcopyMode::Auto, 3, 301.0, Some(300)).expect("over the budget");
        assert!(why.contains("301 ms") && why.contains("300 ms budget"), "{why}");
        // No budget: nothing to fit. No rate measured yet: no budget is known to fit.
        assert_eq!(postcopy_reason(PostcopyMode::Auto, 3, 1e9, None), None);
        let why = postcopy_reason(PostcopyMode::Auto, 3, f64::INFINITY, Some(300)).expect("no rate");
        assert!(why.contains("no link rate"), "{why}");
    }
}
