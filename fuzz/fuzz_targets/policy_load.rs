//! The policy loader on arbitrary text, as default, user and group file: no panic, and every
//! error carries a position inside the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil::policy::LoadError;
use veil::policy::load::from_files;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count().max(1);
    for files in [
        vec![("default.toml", text)],
        vec![("default.toml", "fallback = \"relay\"\n"), ("users/u.toml", text), ("groups/g.toml", text)],
    ] {
        if let Err(errors) = from_files(files) {
            for e in errors.0 {
                if let LoadError::Field { line, column, .. } = e {
                    assert!(line >= 1 && line <= lines + 1 && column >= 1);
                }
            }
        }
    }
});
