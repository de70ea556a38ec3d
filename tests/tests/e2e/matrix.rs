//! TESTPLAN R11, over every RPC the proto defines (read from its descriptor, so that a new RPC
//! is in the matrix the day it is added): each admin-plane RPC without a session, with a forged
//! token, with a workload certificate but no session (the other plane's credential), as an
//! auditor, and as an officer; each RPC on the other plane's listener. Every denial is audited
//! and changes nothing else. The data-plane cells that need a grant (another key, another
//! operation, a context condition, an expired grant, a disabled principal) are in `grants.rs`;
//! certificates from another CA, and none, in `identity.rs`.

use kms_client::Channel;
use kms_client::{AdminChannel, Bearer};
use kms_tests::Server;
use prost::Message;
use tonic::Code;

/// Every RPC of every service in `kms.v1`, as (service, method) names.
fn rpcs() -> Vec<(String, String)> {
    let set = prost_types::FileDescriptorSet::decode(kms_proto::v1::FILE_DESCRIPTOR_SET).unwrap();
    let mut out = Vec::new();
    for file in set.file {
        for service in file.service {
            for method in &service.method {
                out.push((service.name().to_string(), method.name().to_string()));
            }
        }
    }
    out
}

/// What an auditor may call on the admin plane: reads, and their own session and credentials.
const AUDITOR_MAY: &[&str] = &[
    "DescribeKey",
    "ListKeys",
    "ListKeyVersions",
    "ListAliases",
    "ListPrincipals",
    "ListXksKeyStores",
    "GetCseConfiguration",
    "ListQuorumPolicies",
    "ListApprovalRequests",
    "GetApprovalRequest",
    "ListSubscriptions",
    "Watch",
    "ListGrants",
    "ExplainAccess",
    "ListOfficers",
    "AccessReview",
    "DescribeService",
    "VerifyBackup",
    "VerifyAudit",
    "EvidenceReport",
    "VerifyEvidenceReport",
    "ListAuditRecords",
    "ChangePassphrase",
    "ReenrollTotp",
    "Login",
    "Logout",
];

/// Calls `/kms.v1.SERVICE/METHOD` with an empty message (every field at its default), which any
/// request type decodes; the answer's fields are skipped. Only the status matters here, and
/// identity and role are checked before a request is even parsed.
async fn call<T>(channel: T, service: &str, method: &str) -> Code
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        panic!("channel not ready: {}", e.into());
    }
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/kms.v1.{service}/{method}")).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.unary(tonic::Request::new(()), path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn admin_channel(channel: &Channel, token: Option<&str>) -> AdminChannel {
    AdminChannel::new(channel.clone(), Bearer::new(token).unwrap())
}

fn denials(server: &Server) -> i64 {
    server.db().query_row("SELECT COUNT(*) FROM audit WHERE status IN ('UNAUTHENTICATED', 'PERMISSION_DENIED')", [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_by_every_kind_of_caller() {
    let server = Server::start();
    let auditor = kms_tests::add_officer(&server, "ana", "auditor", "auditor passphrase 1").await;
    let auditor_token = kms_tests::login_officer(&server, "ana", "auditor passphrase 1", &auditor).await;
    let admin = server.channel(&server.admin_addr).await;
    let no_cert = kms_client::Tls { cert: None, key: None, ..server.tls() };
    let anonymous = server.channel_with(&server.admin_addr, &no_cert).await.unwrap();
    let data = server.channel(&server.data_addr).await;
    let all = rpcs();
    assert!(all.len() >= 40, "{} RPCs in the descriptor", all.len());
    let admin_side: Vec<_> = all.iter().filter(|(s, _)| s != "Crypto").collect();

    let before = server.state_snapshot();
    let mut denied = 0;
    for (service, method) in &admin_side {
        if *method == "Login" {
            continue; // how a session is had; its own tests cover bad credentials
        }
        let cells = [
            ("no session and no certificate", &anonymous, None),
            ("a forged token", &anonymous, Some("00".repeat(32))),
            ("the workload's certificate (the other plane's credential)", &admin, None),
        ];
        for (who, channel, token) in cells {
            let code = call(admin_channel(channel, token.as_deref()), service, method).await;
            assert_eq!(code, Code::Unauthenticated, "{service}/{method} with {who}");
            denied += 1;
        }
        if !AUDITOR_MAY.contains(&method.as_str()) {
            let code = call(admin_channel(&admin, Some(&auditor_token)), service, method).await;
            assert_eq!(code, Code::PermissionDenied, "{service}/{method} by an auditor");
            denied += 1;
        }
    }
    assert_eq!(server.state_snapshot(), before, "no refused call changed anything");
    kms_tests::eventually("every denial audited", std::time::Duration::from_secs(10), || denials(&server) >= denied);

    // Allowed callers get past identity and role (a default request may still be invalid).
    // Login, Logout, ReenrollTotp and ChangePassphrase (which re-checks the current passphrase
    // and so answers UNAUTHENTICATED to an empty one) have their own tests in `officers.rs`;
    // Watch, a stream that ends only when its caller goes, in `notify.rs`.
    for (service, method) in &admin_side {
        if ["Login", "Logout", "ReenrollTotp", "ChangePassphrase", "Watch"].contains(&method.as_str()) {
            continue;
        }
        for (who, token) in [("the officer", &server.session), ("the auditor", &auditor_token)] {
            if who == "the auditor" && !AUDITOR_MAY.contains(&method.as_str()) {
                continue;
            }
            let code = call(admin_channel(&admin, Some(token)), service, method).await;
            assert!(![Code::Unauthenticated, Code::PermissionDenied, Code::Unimplemented].contains(&code), "{service}/{method} by {who}: {code:?}");
        }
    }

    // Each plane serves only its own services.
    for (service, method) in &all {
        if service == "Crypto" {
            assert_eq!(call(admin_channel(&admin, Some(&server.session)), service, method).await, Code::Unimplemented, "{method} on the admin plane");
        } else {
            assert_eq!(call(data.clone(), service, method).await, Code::Unimplemented, "{service}/{method} on the data plane");
        }
    }
}
