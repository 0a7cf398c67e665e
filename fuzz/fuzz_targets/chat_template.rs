#![no_main]
//! See `tunenet_node::fuzzing::chat_template`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunenet_node::fuzzing::chat_template(data));
