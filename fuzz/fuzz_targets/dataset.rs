#![no_main]
//! See `tunenet_node::fuzzing::dataset`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::dataset(data));
