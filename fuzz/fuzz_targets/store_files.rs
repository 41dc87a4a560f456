//! Task-store files → the witness parser and `tasks::check` (redb opened
//! with its integrity check, every record decoded): damage is a report or
//! an error naming the file, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = federation::tasks::witness::parse(
        Path::new("tasks.hwm"),
        &String::from_utf8_lossy(data),
    );
    let dir = std::env::temp_dir().join(format!("fuzz-store-files-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(dir.join(federation::tasks::FILE), data).is_ok()
    {
        let _ = federation::tasks::check(&dir);
    }
});
