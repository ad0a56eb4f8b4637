//! `amqps://` with a private CA: the worker trusts the broker through `amqp.tls.ca_file`, and
//! refuses it without. The broker here speaks TLS through a TLS-terminating proxy in front of
//! the local RabbitMQ, with certificates made by the test.

use std::sync::Arc;

use crate::helpers::{TestEnv, broker_addr};
use lapin::BasicProperties;
use llmq::{config::SecretUrl, tools::mock::MockOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

/// A CA, and a TLS proxy for "localhost" signed by it; returns the proxy port and CA PEM.
async fn tls_proxy() -> (u16, String) {
    llmq::install_crypto_provider();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = broker_addr();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    (port, ca_cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca() {
    let (port, ca_pem) = tls_proxy().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let mut url = url::Url::parse(&crate::helpers::amqp_url()).unwrap();
    url.set_scheme("amqps").unwrap();
    url.set_host(Some("localhost")).unwrap();
    url.set_port(Some(port)).unwrap();
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.amqp.url = Some(SecretUrl::new(url.to_string()));
        c.amqp.tls.ca_file = ca_file.display().to_string();
    })
    .await;

    // Without the CA the broker's certificate is not trusted.
    let mut untrusting = env.config.amqp.clone();
    untrusting.tls.ca_file.clear();
    let refused = llmq::broker::connection::connect(&untrusting, "tls test").await;
    assert!(
        refused.is_err(),
        "a certificate from an unknown CA is refused"
    );

    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "over TLS", "request_id": "tls-1"}),
        BasicProperties::default(),
    )
    .await;
    let (_, result) = &env.results(1).await[0];
    assert_eq!(result["status"], "ok");
    assert_eq!(result["content"], "mock reply to: over TLS");
    worker.stop().await.unwrap();
    env.cleanup().await;
}
