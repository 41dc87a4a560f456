//! YAML text → `config::load_from_text` → `Policy::from_loaded`: must never
//! panic; errors are values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(loaded) =
        federation::config::load_from_text(std::path::Path::new("fuzz.yaml"), text)
    {
        let _ = federation::policy::Policy::from_loaded(&loaded);
    }
});
