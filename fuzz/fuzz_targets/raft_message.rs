//! Fuzz target `raft_message`: see `gangway_consensus::fuzz::raft_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gangway_consensus::fuzz::raft_message(data));
