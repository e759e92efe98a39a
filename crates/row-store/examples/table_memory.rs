//! Measures the ROW metadata's memory: the mapping table after N updated 4 KiB blocks scattered
//! over a 1 TiB disk (default: 10 GiB written, 2,621,440 blocks).
//! `cargo run --release -p row-store --example table_memory [GIB_WRITTEN]`

use row_store::table::Table;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let gib: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(10);
    let blocks = gib << 18; // 4 KiB blocks per GiB
    let disk_blocks = 1u64 << 28; // 1 TiB
    let before = rss_bytes();
    let mut table = Table::default();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut n = 0;
    while table.len() < blocks {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x % disk_blocks;
        if table.is_mapped(b) {
            table.record_rewrite(b, b + 1);
        } else {
            let slot = table.allocate(1).expect("slots");
            table.record_placed(b, b + 1, slot);
        }
        n += 1;
        if n % 65536 == 0 {
            // A flush journals and drops the pending changes.
            let _ = table.take_pending();
        }
    }
    let _ = table.take_pending();
    let used = rss_bytes() - before;
    println!(
        "{} updated blocks ({gib} GiB) on a 1 TiB disk after {n} writes: {:.1} MiB, {:.1} bytes per block",
        table.len(),
        used as f64 / (1 << 20) as f64,
        used as f64 / table.len() as f64
    );
}
