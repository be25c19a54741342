#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| transportd_fuzz::issuer_config(data));
