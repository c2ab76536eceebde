//! HTTPS settings: the server's certificate chain and key, and optionally a CA whose
//! certificates clients must present (mutual TLS), built into a rustls `ServerConfig`.
//!
//! With a client CA, rustls's `WebPkiClientVerifier` refuses, during the handshake, a
//! client that presents no certificate or one that does not chain to that CA; no HTTP
//! request of such a client ever reaches the handlers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// Files for HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate signed by one.
    pub client_ca: Option<PathBuf>,
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("opening {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    match PrivateKeyDer::from_pem_file(path) {
        Ok(key) => Ok(key),
        Err(pem::Error::NoItemsFound) => bail!("{} holds no PEM private key", path.display()),
        Err(e @ pem::Error::Io(_)) => Err(e).with_context(|| format!("opening {}", path.display())),
        Err(e) => {
            Err(e).with_context(|| format!("reading the private key from {}", path.display()))
        }
    }
}

/// Loads the files and builds the server configuration (TLS 1.2 and 1.3, ring).
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .context("choosing TLS versions")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certs(ca)? {
                roots
                    .add(cert)
                    .with_context(|| format!("adding a CA certificate from {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("building the client verifier from {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .with_context(|| {
            format!(
                "the key {} does not fit the certificate {}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, cert: &str, key: &str) -> TlsFiles {
        std::fs::write(dir.join("cert.pem"), cert).unwrap();
        std::fs::write(dir.join("key.pem"), key).unwrap();
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            client_ca: None,
        }
    }

    fn error(files: &TlsFiles) -> String {
        match server_config(files) {
            Ok(_) => panic!("{files:?} were accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn loads_a_pem_chain_and_key_and_names_the_file_that_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let good = files(dir.path(), &cert.pem(), &key.serialize_pem());
        server_config(&good).unwrap();
        let with_ca = TlsFiles {
            client_ca: Some(good.cert.clone()),
            ..good.clone()
        };
        server_config(&with_ca).unwrap();

        let e = error(&files(dir.path(), "not pem", &key.serialize_pem()));
        assert!(e.contains("cert.pem holds no PEM certificate"), "{e}");
        let e = error(&files(dir.path(), &cert.pem(), &cert.pem()));
        assert!(e.contains("key.pem holds no PEM private key"), "{e}");
        let broken = "-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n";
        let e = error(&files(dir.path(), &cert.pem(), broken));
        assert!(e.contains("reading the private key from"), "{e}");
        let missing = TlsFiles {
            key: dir.path().join("absent.pem"),
            ..good
        };
        let e = error(&missing);
        assert!(e.contains("opening") && e.contains("absent.pem"), "{e}");
    }
}
