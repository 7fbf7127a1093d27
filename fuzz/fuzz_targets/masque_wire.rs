//! The MASQUE decoders (capsules, HTTP Datagrams, bound UDP payloads) and the context tables on
//! arbitrary bytes: no panic, and a decoded capsule re-encodes to the bytes it came from (unknown
//! types excepted, whose value is skipped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil::masque::request::{ClientContexts, ProxyContexts};
use veil::masque::wire::{self, Capsule};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = wire::decode_http_datagram(data) {
        let _ = wire::decode_uncompressed(d.payload);
    }
    let mut proxy = ProxyContexts::new(4);
    let (mut client, _) = ClientContexts::new(4, 1);
    let mut at = 0;
    while let Ok(Some((capsule, used))) = wire::decode_capsule(&data[at..]) {
        if !matches!(capsule, Capsule::Unknown { .. }) {
            let mut again = Vec::new();
            capsule.encode(&mut again);
            let (decoded, n) = wire::decode_capsule(&again).expect("re-encoded capsule decodes").expect("complete");
            assert_eq!((decoded, n), (capsule.clone(), again.len()));
        }
        let _ = proxy.on_capsule(&capsule, |_| true);
        let _ = client.on_capsule(&capsule);
        at += used;
    }
});
