#![no_main]
//! See `tunenet_node::fuzzing::artifact`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::artifact(data));
