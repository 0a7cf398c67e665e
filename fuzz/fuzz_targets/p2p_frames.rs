#![no_main]
//! See `tunenet_node::fuzzing::p2p_frames`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::p2p_frames(data));
