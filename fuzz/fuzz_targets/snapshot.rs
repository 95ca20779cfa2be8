//! Fuzz target `snapshot`: see `gangway_scheduler::fuzz::snapshot`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_scheduler::fuzz::snapshot(data));
