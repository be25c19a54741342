#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| libtransport::fuzzing::workload_response(data));
