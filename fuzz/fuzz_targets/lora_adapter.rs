#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lsplit_fuzz::lora_adapter(data));
