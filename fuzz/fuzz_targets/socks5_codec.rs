//! Every SOCKS5 decoder on arbitrary bytes: no panic, and a complete request uses exactly its
//! bytes and fits the longest legal request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil::socks5::codec;

fuzz_target!(|data: &[u8]| {
    let _ = codec::decode_greeting(data);
    let _ = codec::decode_credentials(data);
    if let Ok(Some((_, used))) = codec::decode_request(data) {
        assert_eq!(used, data.len());
        assert!(used <= codec::MAX_REQUEST_LEN);
    }
    if let Ok(d) = codec::decode_datagram(data) {
        assert!(d.payload.len() < data.len());
    }
});
