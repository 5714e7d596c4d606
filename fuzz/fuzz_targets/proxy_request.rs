#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| airlock::fuzzing::proxy_request(data));
