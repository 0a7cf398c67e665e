#![no_main]
//! See `tunenet_node::fuzzing::upload`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::upload(data));
