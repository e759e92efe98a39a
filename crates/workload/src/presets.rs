//! Named workload profiles modelled on Table 1 of Xue et al. (2013), which characterises real
//! server workloads by the share of their writes that overwrite a block written before.
//!
//! The overwrite share of a run is (writes − distinct blocks written) ÷ writes. It depends on
//! how many writes the run makes, so a preset is turned into a [`Profile`] for an expected
//! number of writes ([`Preset::profile_for`]):
//! - random presets: a hot set of `H = hot_per_overwrite × target × writes` blocks (each hot
//!   block is rewritten about `1 / hot_per_overwrite` times over the run) gets the share `s` of
//!   the writes that makes the expected overwrite share equal the target; the other writes
//!   visit the whole area in a permutation ([`Profile::fresh`]), so they are first writes;
//! - `bonnie`: Bonnie++'s rewrite phase, a sequential rewrite of a file area that wraps, sized
//!   so the run makes `1 / (1 − target)` passes over it.
//!
//! The run's measured share is printed by `row-workload`; it is close to the target when the
//! run makes about the expected number of writes.

use crate::Profile;

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    /// Name used by `--profile`.
    pub name: &'static str,
    /// Target share of writes that overwrite a block written earlier in the run.
    pub overwrite_share: f64,
    /// Hot set size as a fraction of the expected overwrites (random presets).
    pub hot_per_overwrite: f64,
    /// Sequential rewrite of a file area (Bonnie++-like) instead of a hot set.
    pub sequential: bool,
    /// One line for humans.
    pub about: &'static str,
}

/// The presets: the five server traces of the paper's Table 1, and a Bonnie++-like rewrite.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "msn",
        overwrite_share: 0.68,
        hot_per_overwrite: 0.10,
        sequential: false,
        about: "MSN storage file server: 68% of writes overwrite",
    },
    Preset {
        name: "live-maps",
        overwrite_share: 0.006,
        hot_per_overwrite: 0.5,
        sequential: false,
        about: "Live Maps back end: 0.6% of writes overwrite (nearly all first writes)",
    },
    Preset {
        name: "display-ads",
        overwrite_share: 0.88,
        hot_per_overwrite: 0.05,
        sequential: false,
        about: "Display Ads payload server: 88% of writes overwrite",
    },
    Preset {
        name: "source-control",
        overwrite_share: 0.84,
        hot_per_overwrite: 0.08,
        sequential: false,
        about: "source control server: 84% of writes overwrite",
    },
    Preset {
        name: "map-reduce",
        overwrite_share: 0.51,
        hot_per_overwrite: 0.15,
        sequential: false,
        about: "MapReduce cluster node: 51% of writes overwrite",
    },
    Preset {
        name: "bonnie",
        overwrite_share: 2.0 / 3.0,
        hot_per_overwrite: 0.0,
        sequential: true,
        about: "Bonnie++-like sequential rewrite of a file area, 3 passes (67% overwrite)",
    },
];

impl Preset {
    /// The preset called `name`.
    pub fn find(name: &str) -> Option<&'static Preset> {
        PRESETS.iter().find(|p| p.name == name)
    }

    /// The profile over (at most) `area_blocks` blocks whose expected overwrite share after
    /// `writes` writes is the target. For `bonnie` the area is shrunk to the file area.
    pub fn profile_for(&self, area_blocks: u64, writes: u64) -> Profile {
        let writes = writes.max(1);
        let target = self.overwrite_share;
        if self.sequential {
            let file = ((writes as f64 * (1.0 - target)).round() as u64).clamp(1, area_blocks);
            return Profile { area_blocks: file, hot_blocks: 0, hot_share: 0.0, sequential: true, fresh: false };
        }
        let mut hot = ((self.hot_per_overwrite * target * writes as f64).round() as u64).clamp(1, area_blocks);
        loop {
            let at_full = expected_overwrite_share(&fresh(area_blocks, hot, 1.0), writes);
            if at_full >= target || hot == 1 {
                break;
            }
            hot = (hot / 2).max(1);
        }
        // The expected share grows with the hot share: bisect.
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..60 {
            let mid = (lo + hi) / 2.0;
            if expected_overwrite_share(&fresh(area_blocks, hot, mid), writes) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        fresh(area_blocks, hot, (hi * 1e6).round() / 1e6)
    }
}

fn fresh(area_blocks: u64, hot_blocks: u64, hot_share: f64) -> Profile {
    Profile { fresh: true, ..Profile::skewed(area_blocks, hot_blocks, hot_share) }
}

/// The expected overwrite share of `writes` writes of `profile`: 1 − E[distinct blocks] ÷ writes,
/// with each part of the area filled like balls thrown into bins.
pub fn expected_overwrite_share(profile: &Profile, writes: u64) -> f64 {
    let n = writes.max(1) as f64;
    let area = profile.area_blocks as f64;
    if profile.sequential && profile.hot_blocks == 0 {
        return 1.0 - n.min(area) / n;
    }
    let hot = profile.hot_blocks as f64;
    let s = if profile.hot_blocks == 0 { 0.0 } else { profile.hot_share };
    let uniform = n * (1.0 - s);
    let fill = |bins: f64, balls: f64| if bins <= 0.0 { 0.0 } else { bins * (1.0 - (-balls / bins).exp()) };
    let distinct_hot = fill(hot, n * s + uniform * hot / area);
    let distinct_cold = if profile.fresh {
        // A permutation of the area: distinct until it wraps.
        (uniform * (area - hot) / area).min(area - hot)
    } else {
        fill(area - hot, uniform * (area - hot) / area)
    };
    (1.0 - (distinct_hot + distinct_cold) / n).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Workload;

    #[test]
    fn presets_are_named_once_and_valid() {
        for (i, p) in PRESETS.iter().enumerate() {
            assert!(PRESETS[..i].iter().all(|q| q.name != p.name), "{} twice", p.name);
            assert_eq!(Preset::find(p.name), Some(p));
            assert!(p.profile_for(1 << 20, 6000).validate().is_ok(), "{}", p.name);
        }
        assert!(Preset::find("nope").is_none());
    }

    #[test]
    fn measured_overwrite_share_is_near_the_target() {
        // A 4 GiB disk and 2 GiB area at 200 writes/s for 30 s, 120 s; a small disk.
        for (area, writes) in [(1u64 << 20, 6000u64), (1 << 19, 24_000), (65_536, 3000)] {
            for p in PRESETS {
                let profile = p.profile_for(area, writes);
                let expected = expected_overwrite_share(&profile, writes);
                assert!((expected - p.overwrite_share).abs() < 0.01, "{} expects {expected}", p.name);
                let mut got = 0.0;
                for seed in 1..=3 {
                    got += Workload::ledger_after(profile.clone(), seed, writes).overwrite_share() / 3.0;
                }
                let tolerance = 0.02 + 0.02 * p.overwrite_share;
                assert!(
                    (got - p.overwrite_share).abs() < tolerance,
                    "{} area {area} writes {writes}: measured {got:.4}, target {} ({profile:?})",
                    p.name,
                    p.overwrite_share
                );
            }
        }
    }

    #[test]
    fn more_writes_than_expected_overwrite_a_little_more() {
        let p = Preset::find("msn").unwrap();
        let profile = p.profile_for(1 << 20, 6000);
        let twice = Workload::ledger_after(profile.clone(), 1, 12_000).overwrite_share();
        let half = Workload::ledger_after(profile, 1, 3000).overwrite_share();
        assert!(half < 0.68 && 0.68 < twice && twice < 0.75, "half {half}, twice {twice}");
    }

    #[test]
    fn bonnie_rewrites_its_file_area_in_passes() {
        let profile = Preset::find("bonnie").unwrap().profile_for(1 << 20, 3000);
        assert!(profile.sequential && profile.hot_blocks == 0);
        assert_eq!(profile.area_blocks, 1000);
        let ledger = Workload::ledger_after(profile, 1, 3000);
        assert_eq!(ledger.blocks_written(), 1000);
        assert!((ledger.overwrite_share() - 2.0 / 3.0).abs() < 1e-9);
    }
}
