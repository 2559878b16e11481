//! The fan-out server (`wire`) and the ordinary client (`v1`) interoperate over
//! a real gRPC connection on 127.0.0.1:0, and the descriptor set serves
//! reflection.

use std::pin::Pin;

use raven_model::fixtures;
use raven_model::topology::{PeerInfo, Resource, ResourceBody, ResourceName};
use raven_proto::v1::sync_service_client::SyncServiceClient;
use raven_proto::wire::sync_service_server::{SyncService, SyncServiceServer};
use raven_proto::{EncodedResource, EncodedSyncResponse, PROTOCOL_VERSION, UpdateHeader, v1};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

type BoxStream = Pin<Box<dyn Stream<Item = Result<EncodedSyncResponse, Status>> + Send>>;

fn peer(node: &str) -> (ResourceName, Resource) {
    let info = PeerInfo {
        wireguard_public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
        tunnel_port: Some(4500),
        observed_endpoint: Some(fixtures::socket("192.0.2.7:4500")),
        ..fixtures::peer(node, "gw-a")
    };
    (
        ResourceName::peer(&info.node),
        Resource::new(ResourceBody::Peer(info)),
    )
}

/// A hub stand-in: answers a Hello with one snapshot built from shared,
/// pre-encoded resources, and refuses agents that speak another version.
struct FakeHub {
    shared: Vec<EncodedResource>,
}

#[tonic::async_trait]
impl SyncService for FakeHub {
    type SyncStream = BoxStream;

    async fn sync(
        &self,
        request: Request<Streaming<v1::SyncRequest>>,
    ) -> Result<Response<BoxStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::failed_precondition("stream closed before Hello"))?;
        let Some(v1::sync_request::Message::Hello(hello)) = first.message else {
            return Err(Status::failed_precondition("first message must be a Hello"));
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition("unsupported protocol version"));
        }
        let update = EncodedSyncResponse::update(
            UpdateHeader {
                epoch: "epoch-1".into(),
                revision: 42,
                nonce: "n-1".into(),
                snapshot: true,
                snapshot_complete: true,
                removed: vec![],
                intentional_removal: false,
            },
            &self.shared,
        );
        let heartbeat = EncodedSyncResponse::heartbeat(v1::Heartbeat {
            sequence: 1,
            ..Default::default()
        });
        Ok(Response::new(Box::pin(tokio_stream::iter([
            Ok(update),
            Ok(heartbeat),
        ]))))
    }
}

#[tokio::test]
async fn agent_decodes_a_pre_encoded_snapshot_from_the_fan_out_server() {
    let resources = [peer("edge-1"), peer("edge-2")];
    let shared = resources
        .iter()
        .map(|(name, r)| EncodedResource::new(name, r))
        .collect();

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(raven_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid for reflection");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SyncServiceServer::new(FakeHub { shared }))
            .add_service(reflection)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let mut client = SyncServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let hello = v1::SyncRequest {
        message: Some(v1::sync_request::Message::Hello(v1::Hello {
            protocol_version: PROTOCOL_VERSION,
            node_name: "edge-1".into(),
            capabilities: vec![v1::Capability::Delta.into()],
            ..Default::default()
        })),
    };
    let mut inbound = client
        .sync(tokio_stream::iter([hello]).chain(tokio_stream::pending()))
        .await
        .expect("sync")
        .into_inner();

    let first = inbound.message().await.expect("recv").expect("an update");
    let Some(v1::sync_response::Message::Update(update)) = first.message else {
        panic!("expected an update, got {first:?}");
    };
    let decoded = raven_proto::update_from_proto(&update).expect("valid update");
    assert_eq!(decoded.header.revision, 42);
    assert!(decoded.header.snapshot_complete);
    assert_eq!(decoded.resources, resources.to_vec());

    let second = inbound.message().await.expect("recv").expect("a heartbeat");
    assert!(matches!(
        second.message,
        Some(v1::sync_response::Message::Heartbeat(_))
    ));

    server.abort();
}
