//! Fuzz target `worker_request`: see `gangway_scheduler::fuzz::worker_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_scheduler::fuzz::worker_request(data));
