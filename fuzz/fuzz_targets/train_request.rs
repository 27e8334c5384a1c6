#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lsplit_fuzz::train_request(data));
