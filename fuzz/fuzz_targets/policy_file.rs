//! Policy files (YAML rules with CEL conditions and reason templates) from arbitrary text: loading
//! never panics; a broken file is a `PolicyError` naming it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::policy::PolicySet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = PolicySet::from_sources(&[("fuzz.yaml".to_owned(), text.to_owned())]);
});
