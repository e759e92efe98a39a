//! The hand-over protocol: both hosts' session machines, a lossy network, restarts and operator
//! commands, one step per byte (`migration_session::world`). Never two owners.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = migration_session::world::World::run(data) {
        panic!("{e}");
    }
});
