//! Values of the sled store as read from disk: frame and body decoding.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let _ = raven_store::decode_value_for_fuzzing(data);
    });
}
