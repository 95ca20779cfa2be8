//! Fuzz target `client_request`: see `gangway_scheduler::fuzz::client_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_scheduler::fuzz::client_request(data));
