//! `ConnInfo::parse` on arbitrary UTF-8: keyword/value strings and `postgresql://` URIs.
//! It must return a value or an error, never panic, and what it shows of a parsed value
//! (`Debug`, `display_target`) must not depend on the password.

#![no_main]

use cloudmig_fuzz::source::ConnInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ConnInfo::parse(text) {
        Ok(info) => {
            if info.password.is_some() {
                let mut other = info.clone();
                other.password = Some("a different password".to_owned());
                assert_eq!(format!("{info:?}"), format!("{other:?}"));
                assert_eq!(info.display_target(), other.display_target());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
