#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| libtransport::fuzzing::sealed_chunks(data));
