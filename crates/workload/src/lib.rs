//! A deterministic, skewed block-write workload and its verifier.
//!
//! Everything is a pure function of a seed, so a test on the host can re-derive exactly what a
//! guest wrote:
//! - [`Rng`]: a SplitMix64 generator (no `rand` dependency);
//! - [`Profile`] + [`Generator`]: which block each write goes to — a hot set of blocks spread
//!   over the area receives a share of the writes, the rest go uniformly (or, in sequential
//!   mode, in order) over the whole area;
//! - [`fill_block`] / [`inspect`]: 4 KiB block content determined by (block, version, seed)
//!   with a 16-byte header (magic, block, version), so a reader can tell exactly which version
//!   of which block it sees and whether the rest of the block is intact;
//! - [`Ledger`]: the latest version written per block, and [`Workload`] tying them together;
//! - [`presets`]: named profiles modelled on the overwrite shares of real workloads;
//! - [`nbd`]: a minimal blocking NBD client, to drive a proxy's socket directly;
//! - [`aligned`]: block buffers aligned for O_DIRECT.

use std::fmt;

pub mod aligned;
pub mod nbd;
pub mod presets;

pub use presets::{Preset, PRESETS};

/// Size of a workload block in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// Magic at the start of every block the workload writes.
pub const MAGIC: [u8; 4] = *b"RWL1";
/// Size of the block header: magic (4), block (8, little endian), version (4, little endian).
pub const HEADER_SIZE: usize = 16;

/// SplitMix64: small, fast, and good enough for test workloads.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// The SplitMix64 output function: a good 64-bit mixer on its own.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.state)
    }

    /// A uniform value in `0..n` (`n` > 0), without modulo bias worth mentioning (Lemire's
    /// multiply-shift).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// A uniform value in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where the writes go.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Number of blocks the workload writes to (blocks `0..area_blocks` of the area).
    pub area_blocks: u64,
    /// Size of the hot set in blocks (0: no hot set).
    pub hot_blocks: u64,
    /// Share of writes that go to the hot set (0.0..=1.0); the rest go over the whole area.
    pub hot_share: f64,
    /// Non-hot writes rewrite the area in order (wrapping) instead of at uniform random blocks.
    pub sequential: bool,
    /// Non-hot writes visit the area in a seed-dependent full-period permutation instead of at
    /// uniform random blocks: no block is picked twice by them until the whole area has been,
    /// so they are first writes (real workloads such as Live Maps write mostly fresh blocks).
    pub fresh: bool,
}

/// A profile that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileError(pub String);

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProfileError {}

impl Profile {
    /// Uniform writes over `area_blocks` blocks.
    pub fn uniform(area_blocks: u64) -> Self {
        Self { area_blocks, hot_blocks: 0, hot_share: 0.0, sequential: false, fresh: false }
    }

    /// `hot_share` of the writes to a hot set of `hot_blocks`, the rest uniform over the area.
    pub fn skewed(area_blocks: u64, hot_blocks: u64, hot_share: f64) -> Self {
        Self { area_blocks, hot_blocks, hot_share, sequential: false, fresh: false }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), ProfileError> {
        if self.area_blocks == 0 {
            return Err(ProfileError("area must have at least one block".into()));
        }
        if self.area_blocks > u32::MAX as u64 {
            return Err(ProfileError(format!("area of {} blocks is too large", self.area_blocks)));
        }
        if self.hot_blocks > self.area_blocks {
            return Err(ProfileError(format!(
                "hot set ({} blocks) larger than the area ({} blocks)",
                self.hot_blocks, self.area_blocks
            )));
        }
        if !(0.0..=1.0).contains(&self.hot_share) {
            return Err(ProfileError(format!("hot share {} is not in 0..=1", self.hot_share)));
        }
        if self.hot_share > 0.0 && self.hot_blocks == 0 {
            return Err(ProfileError("hot share without a hot set".into()));
        }
        if self.sequential && self.fresh {
            return Err(ProfileError("sequential and fresh exclude each other".into()));
        }
        Ok(())
    }

    /// Share of the writes expected to land in the hot set, counting uniform writes that
    /// happen to hit it.
    pub fn expected_hot_fraction(&self) -> f64 {
        if self.hot_blocks == 0 {
            return 0.0;
        }
        self.hot_share + (1.0 - self.hot_share) * self.hot_blocks as f64 / self.area_blocks as f64
    }
}

/// Picks the block of every write according to a [`Profile`].
///
/// The hot set is spread evenly over the area: hot block `i` is `offset + i * step` with
/// `step = area / hot` and a seed-derived `offset < step`.
#[derive(Debug, Clone)]
pub struct Generator {
    profile: Profile,
    rng: Rng,
    hot_step: u64,
    hot_offset: u64,
    cursor: u64,
    /// Stride and start of the permutation of fresh mode (0, 0 otherwise).
    fresh_step: u64,
    fresh_offset: u64,
}

impl Generator {
    /// A generator for `profile` (which must be valid) seeded with `seed`.
    pub fn new(profile: Profile, seed: u64) -> Self {
        profile.validate().expect("invalid profile");
        let mut rng = Rng::new(mix64(seed ^ 0x005e_ed0f_b10c));
        let hot_step = profile.area_blocks.checked_div(profile.hot_blocks).unwrap_or(1);
        let hot_offset = rng.below(hot_step);
        let (mut fresh_step, mut fresh_offset) = (0, 0);
        if profile.fresh {
            // A golden-ratio stride coprime with the area: consecutive picks land far apart
            // and the sequence visits every block once per period.
            let area = profile.area_blocks;
            fresh_step = ((area as f64 * 0.618_033_988_75) as u64).max(1);
            while gcd(fresh_step, area) != 1 {
                fresh_step += 1;
            }
            fresh_offset = rng.below(area);
        }
        Self { profile, rng, hot_step, hot_offset, cursor: 0, fresh_step, fresh_offset }
    }

    /// The profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Block number (within the area) of hot block `i` (`i < hot_blocks`).
    pub fn hot_block(&self, i: u64) -> u64 {
        debug_assert!(i < self.profile.hot_blocks);
        self.hot_offset + i * self.hot_step
    }

    /// Whether `block` is in the hot set.
    pub fn is_hot(&self, block: u64) -> bool {
        let Some(d) = block.checked_sub(self.hot_offset) else { return false };
        let i = d / self.hot_step;
        i * self.hot_step == d && i < self.profile.hot_blocks
    }

    /// The block (within the area) of the next write.
    pub fn next_block(&mut self) -> u64 {
        let p = &self.profile;
        if p.hot_blocks > 0 && p.hot_share > 0.0 && self.rng.unit() < p.hot_share {
            let i = self.rng.below(p.hot_blocks);
            return self.hot_block(i);
        }
        if p.sequential {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % p.area_blocks;
            b
        } else if p.fresh {
            let b = ((self.fresh_offset as u128 + self.cursor as u128 * self.fresh_step as u128)
                % p.area_blocks as u128) as u64;
            self.cursor = (self.cursor + 1) % p.area_blocks;
            b
        } else {
            self.rng.below(p.area_blocks)
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The latest version written to every block of an area (0: never written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    versions: Vec<u32>,
    writes: u64,
}

impl Ledger {
    /// An empty ledger for an area of `area_blocks` blocks.
    pub fn new(area_blocks: u64) -> Self {
        Self { versions: vec![0; area_blocks as usize], writes: 0 }
    }

    /// Records a write to `block`; returns its new version (1 for the first write).
    pub fn record(&mut self, block: u64) -> u32 {
        let v = &mut self.versions[block as usize];
        *v = v.checked_add(1).expect("version overflow");
        self.writes += 1;
        *v
    }

    /// The latest version of `block` (0: never written).
    pub fn latest(&self, block: u64) -> u32 {
        self.versions.get(block as usize).copied().unwrap_or(0)
    }

    /// Number of blocks in the area.
    pub fn area_blocks(&self) -> u64 {
        self.versions.len() as u64
    }

    /// Number of writes recorded (block writes: a write of several blocks records each).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Number of distinct blocks written.
    pub fn blocks_written(&self) -> u64 {
        self.versions.iter().filter(|&&v| v > 0).count() as u64
    }

    /// Share of the writes that went to a block already written in this run:
    /// (writes − distinct blocks) ÷ writes (0 without writes).
    pub fn overwrite_share(&self) -> f64 {
        if self.writes == 0 {
            return 0.0;
        }
        (self.writes - self.blocks_written()) as f64 / self.writes as f64
    }

    /// `(block, latest version)` of every written block, in block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.versions.iter().enumerate().filter(|(_, &v)| v > 0).map(|(b, &v)| (b as u64, v))
    }

    /// A digest of `(block, version)` over the written blocks (FNV-1a 64), for comparing a
    /// ledger with one rebuilt from a disk.
    pub fn digest(&self) -> u64 {
        digest_of(self.iter())
    }
}

/// FNV-1a 64 over `(block, version)` pairs given in block order.
pub fn digest_of(pairs: impl IntoIterator<Item = (u64, u32)>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (b, v) in pairs {
        for byte in b.to_le_bytes().into_iter().chain(v.to_le_bytes()) {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// One write: `block` (within the area) gets `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write {
    /// Block within the area.
    pub block: u64,
    /// Version written (1-based, per block).
    pub version: u32,
}

/// A generator with its ledger: the sequence of writes a run performs.
///
/// With [`Workload::with_write_blocks`] every write covers `n` consecutive blocks: the
/// generator's profile then counts in units of `n` blocks (unit `u` is blocks `u·n..u·n+n`),
/// and every block of a unit gets its own ledger record, so all blocks of a unit always hold
/// the same version and the ledger stays exact per block.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Picks the blocks (the units, with more than one block per write).
    pub generator: Generator,
    /// What has been handed out so far, per block.
    pub ledger: Ledger,
    write_blocks: u64,
}

impl Workload {
    /// A workload for `profile` (which must be valid) and `seed`.
    pub fn new(profile: Profile, seed: u64) -> Self {
        Self::with_write_blocks(profile, seed, 1)
    }

    /// A workload whose writes cover `write_blocks` (at least 1) consecutive blocks each;
    /// `profile` counts units of that many blocks.
    pub fn with_write_blocks(profile: Profile, seed: u64, write_blocks: u64) -> Self {
        assert!(write_blocks >= 1, "a write covers at least one block");
        let blocks = profile.area_blocks.checked_mul(write_blocks).expect("area too large");
        let ledger = Ledger::new(blocks);
        Self { generator: Generator::new(profile, seed), ledger, write_blocks }
    }

    /// Blocks per write.
    pub fn write_blocks(&self) -> u64 {
        self.write_blocks
    }

    /// The next write, recorded in the ledger: its first block (within the area) and the
    /// version all of its [`Workload::write_blocks`] blocks get.
    pub fn next_write(&mut self) -> Write {
        let n = self.write_blocks;
        let first = self.generator.next_block() * n;
        let version = self.ledger.record(first);
        for b in first + 1..first + n {
            let v = self.ledger.record(b);
            debug_assert_eq!(v, version, "blocks of one unit always share their version");
        }
        Write { block: first, version }
    }

    /// The ledger after the first `writes` writes of `profile` with `seed`.
    pub fn ledger_after(profile: Profile, seed: u64, writes: u64) -> Ledger {
        Self::ledger_after_with(profile, seed, 1, writes)
    }

    /// The ledger after the first `writes` writes of `write_blocks` blocks each.
    pub fn ledger_after_with(profile: Profile, seed: u64, write_blocks: u64, writes: u64) -> Ledger {
        let mut w = Self::with_write_blocks(profile, seed, write_blocks);
        for _ in 0..writes {
            w.next_write();
        }
        w.ledger
    }
}

/// A block header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Block number as written (absolute device block).
    pub block: u64,
    /// Version of the block.
    pub version: u32,
}

/// Fills `buf` (one block) with version `version` of block `block` for `seed`.
pub fn fill_block(buf: &mut [u8], block: u64, version: u32, seed: u64) {
    assert_eq!(buf.len(), BLOCK_SIZE, "fill_block wants one block");
    buf[..4].copy_from_slice(&MAGIC);
    buf[4..12].copy_from_slice(&block.to_le_bytes());
    buf[12..16].copy_from_slice(&version.to_le_bytes());
    fill_body(&mut buf[HEADER_SIZE..], block, version, seed);
}

fn body_seed(block: u64, version: u32, seed: u64) -> u64 {
    mix64(seed ^ mix64(block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ ((version as u64) << 32 | 0x7a11)))
}

fn fill_body(body: &mut [u8], block: u64, version: u32, seed: u64) {
    let mut rng = Rng::new(body_seed(block, version, seed));
    for chunk in body.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

fn body_matches(body: &[u8], block: u64, version: u32, seed: u64) -> bool {
    let mut rng = Rng::new(body_seed(block, version, seed));
    body.chunks(8).all(|chunk| chunk == &rng.next_u64().to_le_bytes()[..chunk.len()])
}

/// Parses the header of a block, if it starts with [`MAGIC`].
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER_SIZE || buf[..4] != MAGIC {
        return None;
    }
    Some(Header {
        block: u64::from_le_bytes(buf[4..12].try_into().unwrap()),
        version: u32::from_le_bytes(buf[12..16].try_into().unwrap()),
    })
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// All zeroes.
    Zero,
    /// An intact block written by the workload.
    Valid(Header),
    /// A workload header whose body is not that version's content (torn or mixed block).
    Torn(Header),
    /// Anything else.
    Foreign,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Zero => f.write_str("zero"),
            Content::Valid(h) => write!(f, "block={},version={}", h.block, h.version),
            Content::Torn(h) => write!(f, "torn(block={},version={})", h.block, h.version),
            Content::Foreign => f.write_str("foreign"),
        }
    }
}

/// Classifies a block read back (one block of [`BLOCK_SIZE`] bytes) written with `seed`.
pub fn inspect(buf: &[u8], seed: u64) -> Content {
    assert_eq!(buf.len(), BLOCK_SIZE, "inspect wants one block");
    match parse_header(buf) {
        Some(h) if body_matches(&buf[HEADER_SIZE..], h.block, h.version, seed) => Content::Valid(h),
        Some(h) => Content::Torn(h),
        None if buf.iter().all(|&b| b == 0) => Content::Zero,
        None => Content::Foreign,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_seed_dependent() {
        let a: Vec<u64> = (0..100).scan(Rng::new(42), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..100).scan(Rng::new(42), |r, _| Some(r.next_u64())).collect();
        let c: Vec<u64> = (0..100).scan(Rng::new(43), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Pinned values: a change here changes what old guests wrote.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn rng_below_and_unit_stay_in_range_and_cover_it() {
        let mut r = Rng::new(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            let x = r.below(10);
            seen[x as usize] += 1;
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
        }
        for (i, &n) in seen.iter().enumerate() {
            assert!((850..1150).contains(&n), "value {i} drawn {n} times of 10000");
        }
        assert_eq!(r.below(1), 0);
    }

    #[test]
    fn profile_validation() {
        assert!(Profile::uniform(10).validate().is_ok());
        assert!(Profile::skewed(100, 10, 0.9).validate().is_ok());
        assert!(Profile::uniform(0).validate().is_err());
        assert!(Profile::skewed(10, 11, 0.5).validate().is_err());
        assert!(Profile::skewed(10, 5, 1.5).validate().is_err());
        assert!(Profile::skewed(10, 0, 0.5).validate().is_err());
    }

    #[test]
    fn hot_set_is_spread_distinct_and_recognised() {
        for (area, hot, seed) in [(1000, 10, 1), (1000, 1000, 2), (1001, 7, 3), (5, 1, 4), (64, 0, 5)] {
            let g = Generator::new(Profile::skewed(area, hot, if hot > 0 { 0.5 } else { 0.0 }), seed);
            let set: std::collections::BTreeSet<u64> = (0..hot).map(|i| g.hot_block(i)).collect();
            assert_eq!(set.len() as u64, hot);
            assert!(set.iter().all(|&b| b < area));
            for b in 0..area {
                assert_eq!(g.is_hot(b), set.contains(&b), "area {area} hot {hot} block {b}");
            }
        }
    }

    #[test]
    fn profile_shares_hold_statistically() {
        const N: u64 = 200_000;
        for (hot, share) in [(64u64, 0.9), (16, 0.5), (256, 0.0), (100, 1.0)] {
            let profile = Profile::skewed(10_000, hot, share);
            let expected = profile.expected_hot_fraction();
            let mut g = Generator::new(profile, 99);
            let mut hot_hits = 0u64;
            let mut per_block = vec![0u32; 10_000];
            for _ in 0..N {
                let b = g.next_block();
                per_block[b as usize] += 1;
                hot_hits += g.is_hot(b) as u64;
            }
            let got = hot_hits as f64 / N as f64;
            assert!((got - expected).abs() < 0.01, "hot {hot} share {share}: got {got}, expected {expected}");
            if share > 0.0 {
                // Hot blocks are about equally hot: each within 25% of the mean.
                let mean = hot_hits as f64 / hot as f64;
                for i in 0..hot {
                    let n = per_block[g.hot_block(i) as usize] as f64;
                    assert!((n - mean).abs() < mean * 0.25, "hot block {i}: {n} writes, mean {mean}");
                }
            }
            if share < 1.0 {
                // Uniform writes spread over the area: the share of cold blocks written is
                // close to 1 - (1 - 1/area)^(uniform writes).
                let cold_written = (0..10_000u64).filter(|&b| !g.is_hot(b) && per_block[b as usize] > 0).count();
                let coverage = cold_written as f64 / (10_000 - hot) as f64;
                let want = 1.0 - (1.0 - 1.0 / 10_000f64).powf(N as f64 * (1.0 - share));
                assert!((coverage - want).abs() < 0.02, "cold coverage {coverage}, expected {want}");
            }
        }
    }

    #[test]
    fn sequential_mode_rewrites_the_area_in_order() {
        let mut g = Generator::new(Profile { sequential: true, ..Profile::uniform(5) }, 1);
        let blocks: Vec<u64> = (0..12).map(|_| g.next_block()).collect();
        assert_eq!(blocks, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]);
        // With a hot set the non-hot writes still sweep in order.
        let mut g = Generator::new(Profile { sequential: true, ..Profile::skewed(1000, 10, 0.5) }, 1);
        let blocks: Vec<u64> = (0..2000).map(|_| g.next_block()).collect();
        let cold: Vec<u64> = blocks.into_iter().filter(|&b| !g.is_hot(b)).take(50).collect();
        assert!(cold.windows(2).all(|w| w[1] > w[0]), "{cold:?}");
    }

    #[test]
    fn fresh_mode_visits_every_block_once_per_period() {
        for (area, seed) in [(1000u64, 1u64), (4096, 2), (7, 3), (1, 4)] {
            let mut g = Generator::new(Profile { fresh: true, ..Profile::uniform(area) }, seed);
            let mut seen: Vec<u64> = (0..area).map(|_| g.next_block()).collect();
            let first = seen.clone();
            seen.sort_unstable();
            assert_eq!(seen, (0..area).collect::<Vec<_>>(), "area {area}");
            let again: Vec<u64> = (0..area).map(|_| g.next_block()).collect();
            assert_eq!(again, first, "the permutation repeats");
        }
        assert!(Profile { fresh: true, sequential: true, ..Profile::uniform(5) }.validate().is_err());
    }

    #[test]
    fn generator_is_deterministic() {
        let p = Profile::skewed(4096, 64, 0.8);
        let a: Vec<u64> = (0..1000).scan(Generator::new(p.clone(), 5), |g, _| Some(g.next_block())).collect();
        let b: Vec<u64> = (0..1000).scan(Generator::new(p.clone(), 5), |g, _| Some(g.next_block())).collect();
        let c: Vec<u64> = (0..1000).scan(Generator::new(p, 6), |g, _| Some(g.next_block())).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn content_round_trips_and_detects_damage() {
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert_eq!(inspect(&buf, 1), Content::Zero);
        fill_block(&mut buf, 123_456_789_012, 77, 9);
        assert_eq!(&buf[..4], b"RWL1");
        let h = Header { block: 123_456_789_012, version: 77 };
        assert_eq!(parse_header(&buf), Some(h));
        assert_eq!(inspect(&buf, 9), Content::Valid(h));
        // Another seed, block or version gives other content.
        assert_eq!(inspect(&buf, 10), Content::Torn(h));
        let mut other = vec![0u8; BLOCK_SIZE];
        fill_block(&mut other, 123_456_789_012, 78, 9);
        assert_ne!(buf[HEADER_SIZE..], other[HEADER_SIZE..]);
        fill_block(&mut other, 123_456_789_013, 77, 9);
        assert_ne!(buf[HEADER_SIZE..], other[HEADER_SIZE..]);
        // A header from one version over the body of another is torn.
        let mut mixed = other.clone();
        mixed[..HEADER_SIZE].copy_from_slice(&buf[..HEADER_SIZE]);
        assert_eq!(inspect(&mixed, 9), Content::Torn(h));
        // A single flipped bit anywhere in the body is caught.
        let mut flipped = buf.clone();
        flipped[BLOCK_SIZE - 1] ^= 1;
        assert_eq!(inspect(&flipped, 9), Content::Torn(h));
        let mut foreign = vec![0u8; BLOCK_SIZE];
        foreign[100] = 1;
        assert_eq!(inspect(&foreign, 9), Content::Foreign);
        assert_eq!(format!("{}", Content::Valid(h)), "block=123456789012,version=77");
    }

    #[test]
    fn ledger_tracks_latest_versions() {
        let mut l = Ledger::new(10);
        assert_eq!(l.blocks_written(), 0);
        assert_eq!(l.record(3), 1);
        assert_eq!(l.record(3), 2);
        assert_eq!(l.record(9), 1);
        assert_eq!(l.record(0), 1);
        assert_eq!(l.latest(3), 2);
        assert_eq!(l.latest(4), 0);
        assert_eq!(l.latest(100), 0);
        assert_eq!(l.writes(), 4);
        assert_eq!(l.blocks_written(), 3);
        assert_eq!(l.iter().collect::<Vec<_>>(), [(0, 1), (3, 2), (9, 1)]);
        assert_eq!(l.digest(), digest_of([(0, 1), (3, 2), (9, 1)]));
        assert_ne!(l.digest(), digest_of([(0, 1), (3, 1), (9, 1)]));
        assert_ne!(l.digest(), Ledger::new(10).digest());
    }

    #[test]
    fn workload_versions_follow_the_ledger_and_replay() {
        let p = Profile::skewed(500, 20, 0.9);
        let mut w = Workload::new(p.clone(), 3);
        let mut mine = Ledger::new(500);
        for _ in 0..5000 {
            let wr = w.next_write();
            assert_eq!(wr.version, mine.record(wr.block));
        }
        assert_eq!(w.ledger, mine);
        assert_eq!(Workload::ledger_after(p, 3, 5000), mine);
        assert_eq!(mine.writes(), 5000);
        // Hot blocks collect most versions: 20 blocks share ~90% of 5000 writes.
        let hot_max = (0..20).map(|i| mine.latest(w.generator.hot_block(i))).max().unwrap();
        assert!(hot_max > 150, "{hot_max}");
    }

    #[test]
    fn multi_block_writes_version_every_block_of_their_unit() {
        // Sequential new data, 16 blocks per write: each write is the next 16 blocks, version 1.
        let p = Profile { sequential: true, ..Profile::uniform(100) };
        let mut w = Workload::with_write_blocks(p, 7, 16);
        assert_eq!(w.write_blocks(), 16);
        assert_eq!(w.ledger.area_blocks(), 1600);
        for i in 0..100 {
            assert_eq!(w.next_write(), Write { block: i * 16, version: 1 });
        }
        assert_eq!(w.ledger.blocks_written(), 1600);
        assert_eq!(w.ledger.overwrite_share(), 0.0);
        // The area wraps: the second pass rewrites every block as version 2.
        assert_eq!(w.next_write(), Write { block: 0, version: 2 });
        assert_eq!((0..16).map(|b| w.ledger.latest(b)).collect::<Vec<_>>(), [2; 16]);
        assert_eq!(w.ledger.latest(16), 1);
        // Random units: all blocks of a unit share its version, the replay matches, and one
        // block per write gives the single-block workload exactly.
        let p = Profile::skewed(50, 5, 0.8);
        let mut w = Workload::with_write_blocks(p.clone(), 3, 4);
        let mut units = Ledger::new(50);
        for _ in 0..2000 {
            let wr = w.next_write();
            assert_eq!(wr.block % 4, 0);
            assert_eq!(wr.version, units.record(wr.block / 4));
        }
        for b in 0..200 {
            assert_eq!(w.ledger.latest(b), units.latest(b / 4), "block {b}");
        }
        assert_eq!(w.ledger.writes(), 8000);
        assert_eq!(Workload::ledger_after_with(p.clone(), 3, 4, 2000), w.ledger);
        assert_eq!(Workload::ledger_after_with(p.clone(), 3, 1, 500), Workload::ledger_after(p, 3, 500));
    }
}
