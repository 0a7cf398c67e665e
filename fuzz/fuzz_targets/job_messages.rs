#![no_main]
//! See `tunenet_node::fuzzing::job_messages`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::job_messages(data));
