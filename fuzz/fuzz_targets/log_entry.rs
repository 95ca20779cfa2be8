//! Fuzz target `log_entry`: see `gangway_scheduler::fuzz::log_entry`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_scheduler::fuzz::log_entry(data));
