use std::collections::BTreeMap;
use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;
use raven_model::fixtures;
use raven_model::names::NodeName;
use raven_model::problem::Problem;
use raven_model::topology::{
    ContentVersion, ExposeType, GatewayEndpoint, GatewayView, Resource, ResourceBody, ResourceName,
};

use crate::arbitrary::{self, agent_report, resource};
use crate::encoded::{SYNC_RESPONSE_UPDATE_FIELD, UPDATE_RESOURCES_FIELD};
use crate::*;

fn node(name: &str) -> NodeName {
    NodeName::new(name).expect("valid node name")
}

fn sample_gateway() -> (ResourceName, Resource) {
    let ep = |n: &str| GatewayEndpoint {
        public_ip: Some(fixtures::ip("192.0.2.1")),
        config: BTreeMap::from([
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ]),
        ..fixtures::endpoint(n, 4500)
    };
    let view = GatewayView {
        expose_type: ExposeType::PublicIP,
        members: vec![fixtures::member("edge-1", "10.0.0.1", &["10.244.1.0/24"])],
        active_tunnel: Some(ep("edge-1")),
        tunnel_candidates: vec![ep("edge-1"), ep("edge-2")],
        ..fixtures::gateway("gw-a")
    };
    (
        ResourceName::gateway(&view.name),
        Resource::new(ResourceBody::Gateway(view)),
    )
}

fn gateway_proto(p: &mut v1::Resource) -> &mut v1::GatewayView {
    match p.body.as_mut() {
        Some(v1::resource::Body::Gateway(g)) => g,
        _ => panic!("not a gateway resource"),
    }
}

fn roundtrip(name: &ResourceName, r: &Resource) -> Result<(), TestCaseError> {
    let proto = resource_to_proto(name, r);
    let bytes = proto.encode_to_vec();
    let decoded =
        v1::Resource::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (name2, r2) =
        resource_from_proto(&decoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&name2, name);
    prop_assert_eq!(&r2, r);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn settings_round_trip_through_proto(s in arbitrary::settings()) {
        let body = ResourceBody::Settings(s);
        roundtrip(&arbitrary::name_of(&body), &Resource::new(body))?;
    }

    #[test]
    fn gateway_views_round_trip_through_proto(g in arbitrary::gateway_view()) {
        let body = ResourceBody::Gateway(g);
        roundtrip(&arbitrary::name_of(&body), &Resource::new(body))?;
    }

    #[test]
    fn node_views_round_trip_through_proto(n in arbitrary::node_view()) {
        let body = ResourceBody::Node(n);
        roundtrip(&arbitrary::name_of(&body), &Resource::new(body))?;
    }

    #[test]
    fn peer_infos_round_trip_through_proto(p in arbitrary::peer_info()) {
        let body = ResourceBody::Peer(p);
        roundtrip(&arbitrary::name_of(&body), &Resource::new(body))?;
    }

    #[test]
    fn domain_prefixes_round_trip_through_proto(g in arbitrary::gateway_view()) {
        let body = ResourceBody::Prefixes(raven_model::topology::DomainPrefixes::of(&g));
        roundtrip(&arbitrary::name_of(&body), &Resource::new(body))?;
    }

    #[test]
    fn equal_resources_encode_to_equal_bytes((name, r) in resource()) {
        let once = resource_to_proto(&name, &r).encode_to_vec();
        let twice = resource_to_proto(&name, &r).encode_to_vec();
        let of_clone = resource_to_proto(&name, &r.clone()).encode_to_vec();
        prop_assert_eq!(&once, &twice);
        prop_assert_eq!(&once, &of_clone);
        // Decoding and re-encoding is the identity on the bytes: the encoding
        // is canonical.
        let decoded = v1::Resource::decode(once.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (n2, r2) = resource_from_proto(&decoded).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(resource_to_proto(&n2, &r2).encode_to_vec(), once);
    }

    #[test]
    fn a_tampered_version_is_rejected((name, r) in resource(), flip in 0usize..16) {
        let mut proto = resource_to_proto(&name, &r);
        let mut chars: Vec<char> = proto.version.chars().collect();
        chars[flip] = if chars[flip] == '0' { '1' } else { '0' };
        proto.version = chars.into_iter().collect();
        let err = resource_from_proto(&proto).expect_err("tampered version accepted");
        let is_mismatch = matches!(err, ConversionError::VersionMismatch { .. });
        prop_assert!(is_mismatch, "{}", err);
    }

    #[test]
    fn encoded_update_is_byte_identical_to_prost(
        resources in vec(resource(), 0..6),
        epoch in "[a-z0-9-]{0,12}",
        revision in any::<u64>(),
        nonce in "[a-z0-9]{0,8}",
        flags in any::<[bool; 3]>(),
        removed in vec(arbitrary::node_name().prop_map(|n| ResourceName::peer(&n)), 0..4),
    ) {
        let header = UpdateHeader {
            epoch,
            revision,
            nonce,
            snapshot: flags[0],
            snapshot_complete: flags[0] && flags[1],
            removed,
            intentional_removal: flags[2],
        };
        let protos: Vec<v1::Resource> = resources.iter().map(|(n, r)| resource_to_proto(n, r)).collect();
        let encoded: Vec<EncodedResource> = protos.iter().map(EncodedResource::from_proto).collect();

        let expected = v1::SyncResponse {
            message: Some(v1::sync_response::Message::Update(update_to_proto(&header, protos))),
        };
        let fast = EncodedSyncResponse::update(header, &encoded);
        let bytes = fast.encode_to_vec();
        prop_assert_eq!(fast.encoded_len(), bytes.len());
        prop_assert_eq!(&bytes, &expected.encode_to_vec());
        prop_assert_eq!(fast.shared_resources(), encoded.len());

        // The ordinary client type decodes it.
        let decoded = v1::SyncResponse::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&decoded, &expected);

        // And decoding into the encode-only type keeps the bytes.
        let raw = EncodedSyncResponse::decode(bytes.as_slice()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(raw.encode_to_vec(), bytes);
    }

    #[test]
    fn reports_round_trip_through_proto(r in agent_report()) {
        let proto = report_to_proto(&r);
        let back = report_from_proto(&proto).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back, r);
    }
}

#[test]
fn decoded_update_returns_resources_and_removals_in_order() {
    let (name, r) = sample_gateway();
    let header = UpdateHeader {
        epoch: "e1".into(),
        revision: 7,
        nonce: "n1".into(),
        snapshot: true,
        snapshot_complete: true,
        removed: vec![ResourceName::peer(&node("gone"))],
        intentional_removal: false,
    };
    let proto = update_to_proto(&header, vec![resource_to_proto(&name, &r)]);
    let decoded = update_from_proto(&proto).expect("valid update");
    assert_eq!(decoded.header, header);
    assert_eq!(decoded.resources, vec![(name, r)]);
}

#[test]
fn an_update_naming_a_resource_twice_or_updating_and_removing_it_is_rejected() {
    let (name, r) = sample_gateway();
    let res = resource_to_proto(&name, &r);
    let twice = v1::Update {
        resources: vec![res.clone(), res.clone()],
        ..Default::default()
    };
    assert_eq!(
        update_from_proto(&twice)
            .expect_err("duplicate accepted")
            .to_string(),
        "resource gateway/gw-a: name: appears twice in one update"
    );
    let both = v1::Update {
        resources: vec![res],
        removed: vec!["gateway/gw-a".into()],
        ..Default::default()
    };
    assert_eq!(
        update_from_proto(&both)
            .expect_err("contradiction accepted")
            .to_string(),
        "update: removed[0]: gateway/gw-a is both updated and removed"
    );
    let complete_delta = v1::Update {
        snapshot_complete: true,
        ..Default::default()
    };
    assert!(update_from_proto(&complete_delta).is_err());
    let bad_removal = v1::Update {
        removed: vec!["everything".into()],
        ..Default::default()
    };
    assert_eq!(
        update_from_proto(&bad_removal)
            .expect_err("bad name accepted")
            .to_string(),
        r#"update: removed[0]: "everything" is not a resource name"#
    );
}

#[test]
fn conversion_errors_name_resource_field_and_value() {
    let (name, r) = sample_gateway();

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).members[0].private_ip = "x".into();
    let err = resource_from_proto(&p).expect_err("bad IP accepted");
    assert_eq!(
        err.to_string(),
        r#"resource gateway/gw-a: members[0].private_ip: "x" is not an IP address"#
    );
    assert_eq!(err.resource_name(), Some("gateway/gw-a"));
    assert_eq!(err.field(), "members[0].private_ip");
    let detail = v1::ErrorDetail::from(&err);
    assert_eq!(detail.resource_name, "gateway/gw-a");
    assert_eq!(detail.field, "members[0].private_ip");
    assert_eq!(detail.message, err.to_string());

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).tunnel_candidates[1].port = 70000;
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("bad port accepted")
            .to_string(),
        r#"resource gateway/gw-a: tunnel_candidates[1].port: "70000" is not a port number (0-65535)"#
    );

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p)
        .active_tunnel
        .as_mut()
        .expect("active tunnel")
        .config
        .reverse();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("unsorted map accepted")
            .to_string(),
        r#"resource gateway/gw-a: active_tunnel.config[1].key: "a" is out of order or repeated (keys must be sorted and unique)"#
    );

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).members[0].subnets[0] = "10.244.1.0/33".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("bad CIDR accepted")
            .to_string(),
        r#"resource gateway/gw-a: members[0].subnets[0]: "10.244.1.0/33" is not a CIDR"#
    );

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).tunnel_candidates[0].r#type = v1::EndpointType::Unspecified.into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("unspecified enum accepted")
            .to_string(),
        "resource gateway/gw-a: tunnel_candidates[0].type: missing"
    );

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).expose_type = 42;
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("unknown enum accepted")
            .to_string(),
        r#"resource gateway/gw-a: expose_type: "42" is not a known expose type"#
    );

    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).members[0].node = "Edge_1".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("bad node name accepted")
            .to_string(),
        r#"resource gateway/gw-a: members[0].node: "Edge_1" is not a valid node name"#
    );

    let mut p = resource_to_proto(&name, &r);
    p.body = None;
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("empty resource accepted")
            .to_string(),
        "resource gateway/gw-a: body: missing"
    );

    let mut p = resource_to_proto(&name, &r);
    p.name = "gateways/gw-a".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("bad name accepted")
            .to_string(),
        r#"resource gateways/gw-a: name: "gateways/gw-a" is not a resource name (settings, gateway/<name>, prefixes/<name>, node/<name> or peer/<name>)"#
    );

    // Packed prefixes that do not decode, and a prefixes body under a
    // gateway's name.
    let gw_a = raven_model::GatewayName::new("gw-a").unwrap_or_else(|_| unreachable!());
    let prefixes = ResourceName::prefixes(&gw_a);
    let mut p = resource_to_proto(
        &prefixes,
        &Resource::new(ResourceBody::Prefixes(
            raven_model::topology::DomainPrefixes {
                gateway: gw_a,
                prefixes: vec!["10.0.0.0/8".parse().unwrap_or_else(|_| unreachable!())],
                endpoint_addresses: Vec::new(),
            },
        )),
    );
    if let Some(v1::resource::Body::Prefixes(d)) = &mut p.body {
        d.prefixes = Some(v1::PackedPrefixes {
            ipv4: vec![64, 2, 1, 0],
            ipv6: Vec::new(),
        });
    }
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("a repeated prefix accepted")
            .to_string(),
        r#"resource prefixes/gw-a: prefixes.ipv4: "<packed bytes>" repeats an address"#
    );
    p.name = "gateway/gw-a".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("prefixes under a gateway's name accepted")
            .to_string(),
        "resource gateway/gw-a: body: holds a prefixes body, which belongs under prefixes/<gateway>"
    );
}

#[test]
fn a_body_under_another_name_is_rejected() {
    let (name, r) = sample_gateway();
    let mut p = resource_to_proto(&name, &r);
    p.name = "gateway/gw-b".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("misnamed resource accepted")
            .to_string(),
        r#"resource gateway/gw-b: name: "gw-a" does not match the resource name"#
    );
    p.name = "node/gw-a".into();
    assert_eq!(
        resource_from_proto(&p)
            .expect_err("wrong kind accepted")
            .to_string(),
        "resource node/gw-a: body: holds a gateway body, which belongs under gateway/gw-a"
    );
}

#[test]
fn changed_content_under_the_old_version_is_rejected() {
    let (name, r) = sample_gateway();
    let mut p = resource_to_proto(&name, &r);
    gateway_proto(&mut p).members[0].ready = false;
    let err = resource_from_proto(&p).expect_err("tampered content accepted");
    let ResourceBody::Gateway(mut g) = r.body.clone() else {
        panic!("not a gateway")
    };
    g.members[0].ready = false;
    assert_eq!(
        err,
        ConversionError::VersionMismatch {
            subject: Subject::Resource("gateway/gw-a".into()),
            received: r.version.to_string(),
            computed: ContentVersion::of(&ResourceBody::Gateway(g)).to_string(),
        }
    );
    assert_eq!(err.field(), "version");
}

#[test]
fn heartbeats_encode_like_prost() {
    let hb = v1::Heartbeat {
        sequence: 3,
        sent_at: Some(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 5,
        }),
        interval: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
    };
    let expected = v1::SyncResponse {
        message: Some(v1::sync_response::Message::Heartbeat(hb)),
    };
    assert_eq!(
        EncodedSyncResponse::heartbeat(hb).encode_to_vec(),
        expected.encode_to_vec()
    );
}

#[test]
fn an_empty_update_still_encodes_the_update_field() {
    let fast = EncodedSyncResponse::update(UpdateHeader::default(), &[]);
    let expected = v1::SyncResponse {
        message: Some(v1::sync_response::Message::Update(v1::Update::default())),
    };
    assert_eq!(fast.encode_to_vec(), expected.encode_to_vec());
}

#[test]
fn cleared_encoded_response_encodes_to_nothing() {
    let (name, r) = sample_gateway();
    let mut fast =
        EncodedSyncResponse::update(UpdateHeader::default(), &[EncodedResource::new(&name, &r)]);
    fast.clear();
    assert!(fast.encode_to_vec().is_empty());
    assert_eq!(fast.encoded_len(), 0);
}

#[test]
fn problems_round_trip_and_reject_unspecified_severity() {
    let p = Problem::warning(
        "Gateway/gw",
        "spec.endpoints[0].publicIP",
        "47.xx",
        "not an IP",
    );
    assert_eq!(problem_from_proto(&problem_to_proto(&p)), Ok(p.clone()));
    let mut proto = problem_to_proto(&p);
    proto.severity = 0;
    assert_eq!(
        problem_from_proto(&proto)
            .expect_err("unspecified accepted")
            .to_string(),
        "problem: severity: missing"
    );
}

#[test]
fn reports_with_bad_keys_endpoints_or_unsorted_failover_are_rejected() {
    let bad_key = v1::Report {
        wireguard_public_key: Some("not-a-key".into()),
        ..Default::default()
    };
    assert_eq!(
        report_from_proto(&bad_key)
            .expect_err("bad key accepted")
            .to_string(),
        r#"report: wireguard_public_key: "not-a-key" is not a WireGuard public key (44 characters of base64)"#
    );
    let bad_endpoint = v1::Report {
        peers: vec![v1::PeerTunnelState {
            peer_node: "edge-2".into(),
            endpoint: "192.0.2.1".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        report_from_proto(&bad_endpoint)
            .expect_err("bad endpoint accepted")
            .to_string(),
        r#"report: peers[0].endpoint: "192.0.2.1" is not an address and port (ip:port, [ipv6]:port)"#
    );
    let failover = |g: &str| v1::LocalFailover {
        gateway: g.into(),
        active_node: "edge-1".into(),
    };
    let unsorted = v1::Report {
        local_failover: vec![failover("gw-b"), failover("gw-a")],
        ..Default::default()
    };
    assert_eq!(
        report_from_proto(&unsorted)
            .expect_err("unsorted accepted")
            .to_string(),
        r#"report: local_failover[1].gateway: "gw-a" is out of order or repeated (sorted, unique gateways)"#
    );
    let unsorted_dead = v1::Report {
        dead_candidates: vec!["edge-2".into(), "edge-1".into()],
        ..Default::default()
    };
    assert_eq!(
        report_from_proto(&unsorted_dead)
            .expect_err("unsorted accepted")
            .to_string(),
        r#"report: dead_candidates[1]: "edge-1" is out of order or repeated (sorted, unique nodes)"#
    );
    let too_many = v1::Report {
        dead_candidates: (0..=raven_model::report::MAX_DEAD_CANDIDATES)
            .map(|i| format!("edge-{i:02}"))
            .collect(),
        ..Default::default()
    };
    assert!(
        report_from_proto(&too_many)
            .expect_err("unbounded accepted")
            .to_string()
            .contains("lists more than 16 nodes"),
    );
    let good = v1::Report {
        wireguard_public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
        tunnel_port: Some(51820),
        local_endpoints: vec!["[fd00::1]:51820".into()],
        ..Default::default()
    };
    assert!(report_from_proto(&good).is_ok());
}

#[test]
fn hello_inventory_parses_names_and_rejects_duplicates() {
    let (name, r) = sample_gateway();
    let mut hello = v1::Hello {
        resources: resource_versions_to_proto([(&name, &r.version)]),
        ..Default::default()
    };
    assert_eq!(
        hello_inventory(&hello),
        Ok(BTreeMap::from([(name.clone(), r.version.clone())]))
    );
    hello.resources.push(hello.resources[0].clone());
    assert_eq!(
        hello_inventory(&hello)
            .expect_err("duplicate accepted")
            .to_string(),
        "hello: resources[1].name: gateway/gw-a is listed twice"
    );
}

#[test]
fn topology_response_carries_resources_and_problems_once_without_the_deprecated_json_copy() {
    let (name, r) = sample_gateway();
    let topology = raven_model::Topology {
        resources: BTreeMap::from([(name, r)]),
        problems: vec![Problem::error("Node/x", "", "", "broken")],
    };
    let resp = topology_to_proto("e", 3, &topology);
    assert_eq!(resp.resources.len(), 1);
    assert_eq!(resp.problems.len(), 1);
    assert_eq!(resp.total_resources, 1);
    #[allow(deprecated)]
    let json = resp.json;
    assert_eq!(json, "");
}

#[test]
fn resource_exhausted_carries_a_retry_hint() {
    let status = resource_exhausted(Duration::from_millis(1500));
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(retry_after(&status), Some(Duration::from_millis(1500)));
    assert_eq!(retry_after(&tonic::Status::unavailable("x")), None);
}

#[test]
fn descriptor_set_holds_both_services_and_matching_field_numbers() {
    let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes");
    let services: Vec<String> = fds
        .file
        .iter()
        .flat_map(|f| {
            f.service
                .iter()
                .map(move |s| format!("{}.{}", f.package(), s.name()))
        })
        .collect();
    assert!(
        services.contains(&"raven.v1.SyncService".to_owned()),
        "{services:?}"
    );
    assert!(
        services.contains(&"raven.v1.InspectService".to_owned()),
        "{services:?}"
    );

    // The hand-written encoder in `encoded` relies on these field numbers.
    let message = |name: &str| {
        fds.file
            .iter()
            .flat_map(|f| f.message_type.iter())
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("message {name} missing"))
            .clone()
    };
    let number = |m: &prost_types::DescriptorProto, field: &str| {
        m.field
            .iter()
            .find(|f| f.name() == field)
            .map(|f| f.number())
            .unwrap_or_else(|| panic!("field {field} missing"))
    };
    assert_eq!(
        number(&message("SyncResponse"), "update"),
        SYNC_RESPONSE_UPDATE_FIELD as i32
    );
    assert_eq!(
        number(&message("Update"), "resources"),
        UPDATE_RESOURCES_FIELD as i32
    );
    // Update's header fields come before `resources`, the removal fields after.
    let update = message("Update");
    for f in [
        "epoch",
        "revision",
        "nonce",
        "snapshot",
        "snapshot_complete",
    ] {
        assert!(number(&update, f) < UPDATE_RESOURCES_FIELD as i32, "{f}");
    }
    for f in ["removed", "intentional_removal"] {
        assert!(number(&update, f) > UPDATE_RESOURCES_FIELD as i32, "{f}");
    }
}

#[test]
fn protocol_version_is_one() {
    assert_eq!(PROTOCOL_VERSION, 1);
}

#[test]
fn an_ipsec_peer_is_observed_while_its_ike_sa_is_established_whatever_its_child_sas_age() {
    let row = |node: &str, age: u64, state: &str| v1::PeerTunnelState {
        peer_node: node.into(),
        endpoint: "203.0.113.20:4500".into(),
        handshake_age_seconds: Some(age),
        ipsec_state: state.into(),
        ..Default::default()
    };
    let r = v1::Report {
        peers: vec![
            // An hour since the last CHILD_SA rekey, the IKE_SA still up.
            row("edge-1", 3000, "ESTABLISHED/INSTALLED"),
            row("edge-2", 1, "CONNECTING"),
            // WireGuard: a stale handshake is no observation.
            row("edge-3", 3000, ""),
            row("edge-4", 5, ""),
        ],
        ..Default::default()
    };
    let parsed = report_from_proto(&r).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed
            .observed_peers
            .keys()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["edge-1", "edge-4"]
    );
}
