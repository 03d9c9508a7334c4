//! `pgoutput::decode` on arbitrary bytes: it must return an error, never panic, and never
//! allocate more than the input justifies (libFuzzer's `-rss_limit_mb` and
//! `-malloc_limit_mb` catch that). The first byte picks `in_stream`, the rest is the message.

#![no_main]

use bytes::Bytes;
use cloudmig_fuzz::source::pgoutput::{decode, Decoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, message)) = data.split_first() else {
        return;
    };
    let bytes = Bytes::copy_from_slice(message);
    let in_stream = mode & 1 == 1;
    if let Ok(msg) = decode(&bytes, in_stream) {
        // A decoded message never claims more than the input held.
        let held = match &msg {
            Message::Insert { new, .. } => new.0.len(),
            Message::Relation { columns, .. } => columns.len(),
            Message::Truncate { relations, .. } => relations.len(),
            _ => 0,
        };
        assert!(held <= message.len());
    }
    // The tracking decoder agrees with the plain one.
    let mut decoder = Decoder::new();
    if in_stream {
        let _ = decoder.decode(&Bytes::from_static(b"S\0\0\0\x01\x01"));
    }
    assert_eq!(decoder.decode(&bytes).ok(), decode(&bytes, in_stream).ok());
});
