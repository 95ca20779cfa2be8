//! Fuzz target `backup`: see `gangway_scheduler::fuzz::backup`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_scheduler::fuzz::backup(data));
