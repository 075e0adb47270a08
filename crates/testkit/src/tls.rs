//! Throwaway certificates for TLS tests, generated at test time with `rcgen` (never committed): a private CA and
//! a server certificate it signed for `localhost` and `127.0.0.1`, written as PEM files into a temp dir.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;

/// A private CA and one server certificate signed by it. The files live until this value is dropped.
#[derive(Debug)]
pub struct TestCerts {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    dir: TempDir,
}

impl TestCerts {
    /// A new CA (`ferry test CA <unique>`) and a server certificate for `localhost` and `127.0.0.1`.
    pub fn generate() -> anyhow::Result<Self> {
        Self::generate_for(&["localhost", "127.0.0.1"])
    }

    /// Like [`generate`](Self::generate) with the server certificate's names (DNS names or IP addresses).
    pub fn generate_for(names: &[&str]) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        // A name of its own: two test CAs must not look like the issuer of each other's certificates.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("ferry test CA {}-{nonce}", std::process::id()),
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().context("CA key")?;
        let ca_cert = ca_params.self_signed(&ca_key).context("CA certificate")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ferry test server");
        let key = KeyPair::generate().context("server key")?;
        let cert = params
            .signed_by(&key, &issuer)
            .context("server certificate")?;

        let dir = tempfile::Builder::new()
            .prefix("ferry-tls-")
            .tempdir()
            .context("cannot create a temp dir for certificates")?;
        let write = |name: &str, text: String| -> anyhow::Result<PathBuf> {
            let path = dir.path().join(name);
            fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
            Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", ca_cert.pem())?,
            cert: write("server.pem", cert.pem())?,
            key: write("server.key", key.serialize_pem())?,
            dir,
        })
    }

    /// The CA certificate (PEM): what a client trusts.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// The server certificate (PEM).
    pub fn cert_file(&self) -> &Path {
        &self.cert
    }

    /// The server certificate's private key (PKCS#8 PEM).
    pub fn key_file(&self) -> &Path {
        &self.key
    }

    /// The CA certificate as PEM bytes.
    pub fn ca_pem(&self) -> anyhow::Result<Vec<u8>> {
        fs::read(&self.ca).with_context(|| format!("cannot read {}", self.ca.display()))
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
