#![no_main]
//! Placeholder: replaced by the real target.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = data;
});
