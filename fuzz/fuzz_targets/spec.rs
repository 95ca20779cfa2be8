//! Fuzz target `spec`: see `gangway_proto::fuzz::spec`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_proto::fuzz::spec(data));
