#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| airlock::fuzzing::media_type(data));
