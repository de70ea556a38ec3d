//! Mutual TLS on the data plane: only workloads with a certificate from the customer's CA get
//! in, and the audit names them by their certificate's identity.

use kms_client::Tls;
use kms_proto::v1 as pb;
use kms_proto::v1::crypto_client::CryptoClient;
use kms_tests::Server;

/// Whether a data-plane call with these client settings gets an answer.
async fn data_plane_answers(server: &Server, tls: &Tls) -> bool {
    match server.channel_with(&server.data_addr, tls).await {
        Err(_) => false,
        Ok(channel) => {
            CryptoClient::new(channel).generate_random(pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None }).await.is_ok()
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_admits_only_certificates_from_the_customer_ca() {
    let server = Server::start();
    kms_tests::register_workload(&mut server.admin().await).await;
    let ca = server.pki_dir().join("ca.pem");
    assert!(data_plane_answers(&server, &server.tls()).await, "the customer's workload gets in");

    let no_cert = Tls { ca: Some(ca.clone()), cert: None, key: None };
    assert!(!data_plane_answers(&server, &no_cert).await, "no client certificate");

    let other = tempfile::tempdir().unwrap();
    let foreign = kms_server::tls::DevPki::ensure(other.path()).unwrap();
    let other_ca = Tls { ca: Some(ca.clone()), cert: Some(foreign.workload_cert), key: Some(foreign.workload_key) };
    assert!(!data_plane_answers(&server, &other_ca).await, "a certificate from another CA");

    // Plaintext HTTP/2 to the TLS listener gets nowhere either.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", server.data_addr)).unwrap().connect().await;
    if let Ok(channel) = plain {
        assert!(CryptoClient::new(channel).generate_random(pb::GenerateRandomRequest { number_of_bytes: 4, caller_context: None }).await.is_err());
    }

    // The admin plane is TLS without client certificates: officers log in instead.
    let admin_only_ca = Tls { ca: Some(ca), cert: None, key: None };
    let channel = server.channel_with(&server.admin_addr, &admin_only_ca).await.unwrap();
    let bearer = kms_client::Bearer::new(Some(&server.session)).unwrap();
    kms_proto::v1::key_management_client::KeyManagementClient::new(kms_client::AdminChannel::new(channel, bearer))
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap();

    // The audit names the workload by its certificate's SPIFFE ID.
    let principal: String =
        server.db().query_row("SELECT principal FROM audit WHERE operation = 'GenerateRandom' AND outcome = 'allowed'", [], |r| r.get(0)).unwrap();
    assert_eq!(principal, kms_server::tls::DEV_WORKLOAD_ID);
}

#[test]
fn a_broken_tls_setup_stops_startup_naming_the_file() {
    let server = Server::start();
    let config = std::fs::read_to_string(server.config_path()).unwrap();
    let key = server.pki_dir().join("server.key");
    let broken = config.replace(&format!("key_file = {:?}", key), &format!("key_file = {:?}", server.pki_dir().join("ca.pem")));
    assert_ne!(broken, config);
    let path = server.dir.path().join("broken.toml");
    std::fs::write(&path, broken).unwrap();
    let out = std::process::Command::new(kms_tests::bin("kms-server")).arg("check-config").arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls") && err.contains("ca.pem") && err.contains("private key"), "{err}");

    let missing = config.replace(&format!("{:?}", server.pki_dir().join("ca.pem")), "\"/nonexistent/ca.pem\"");
    std::fs::write(&path, missing).unwrap();
    let out = std::process::Command::new(kms_tests::bin("kms-server")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success(), "the server must not start");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}
