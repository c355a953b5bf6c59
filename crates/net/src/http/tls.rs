//! TLS termination: loading a certificate chain and key from PEM files
//! into a rustls server configuration (ring provider, TLS 1.2 and 1.3,
//! ALPN `h2` and `http/1.1`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or parsed as PEM.
    #[error("cannot read certificate file {path}: {source}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no `CERTIFICATE` block.
    #[error("no certificate found in {0} (expected a PEM `BEGIN CERTIFICATE` block)")]
    NoCertificate(PathBuf),
    /// The key file could not be read, or holds no private key.
    #[error(
        "cannot read private key from {path}: {source} (expected a PEM PKCS#8, PKCS#1 or SEC1 key)"
    )]
    Key {
        /// The file.
        path: PathBuf,
        /// The reason.
        source: rustls::pki_types::pem::Error,
    },
    /// rustls rejected the pair (for example a key that does not match the
    /// certificate, or an unsupported key type).
    #[error("certificate {cert} and key {key} cannot be used: {source}")]
    Rejected {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
}

/// A server configuration from a PEM certificate chain (leaf first) and a
/// PEM private key.
pub fn load_tls(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Certificate {
            path: cert_path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(cert_path.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Key {
        path: key_path.to_path_buf(),
        source,
    })?;
    let rejected = |source| TlsError::Rejected {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        source,
    };
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(rejected)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(rejected)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
