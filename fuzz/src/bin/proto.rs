//! Protobuf bytes from the network into the domain: what the hub decodes
//! from an agent (SyncRequest: Hello, Report) and what an agent decodes
//! from a hub (Update, with every resource).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        use prost::Message;
        use raven_proto::v1;
        if let Ok(req) = v1::SyncRequest::decode(data) {
            match req.message {
                Some(v1::sync_request::Message::Hello(h)) => {
                    let _ = raven_proto::hello_inventory(&h);
                }
                Some(v1::sync_request::Message::Report(r)) => {
                    let _ = raven_proto::report_from_proto(&r);
                }
                _ => {}
            }
        }
        if let Ok(u) = v1::Update::decode(data) {
            let _ = raven_proto::update_from_proto(&u);
        }
    });
}
