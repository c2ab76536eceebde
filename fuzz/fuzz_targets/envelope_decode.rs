//! `jobz::envelope::decode` on arbitrary bytes: every frame a peer (or anyone who can reach
//! a socket) sends goes through it. It must return an error, never panic, hang or allocate
//! without bound; whatever it accepts must survive an encode/decode round trip unchanged.
#![no_main]

use jobz::envelope::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    let Ok(envelope) = decode(frame) else {
        return;
    };
    // A re-encoding may legitimately be refused (named fields make it larger), never wrong.
    if let Ok(again) = encode(&envelope) {
        match decode(&again) {
            Ok(back) => assert_eq!(back, envelope, "round trip changed the envelope"),
            Err(e) => panic!("re-encoded envelope does not decode: {e}"),
        }
    }
});
