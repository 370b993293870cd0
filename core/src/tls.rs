//! TLS to the broker (`amqps://`): the files a client needs, checked when they are set, and the
//! rustls configuration made from them at each connection.
//!
//! The server's certificate chain and its host name are always verified, against the CA file
//! when one is given and otherwise against the system's trusted roots. There is no way to turn
//! verification off. The crypto provider is passed to rustls explicitly (ring), so nothing
//! process-wide is installed in a Postgres backend.

use amqprs::tls::TlsAdaptor;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files of `outbox.amqp_tls_ca_file`, `outbox.amqp_tls_cert_file` and
/// `outbox.amqp_tls_key_file`; `None` for a setting left empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificates of the authorities that may sign the broker's certificate; `None`: the
    /// system's trusted roots.
    pub ca_file: Option<PathBuf>,
    /// The client's certificate (chain), for brokers that require one (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// Changes when a file is replaced or changed (inode, size, modification and change
    /// times), so that a reload after a certificate was rotated reconnects.
    pub stamp: u64,
    /// Set when the CA setting is empty only because the value configured for it was refused
    /// (a file missing when the server started, say): then nothing connects, rather than
    /// falling back to the system's roots, which would trust far more than was configured.
    pub ca_file_refused: bool,
}

impl TlsFiles {
    pub fn new(ca_file: Option<PathBuf>, cert_file: Option<PathBuf>, key_file: Option<PathBuf>) -> Self {
        let stamp = [&ca_file, &cert_file, &key_file]
            .into_iter()
            .flatten()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| {
                let times = (m.mtime() as u64) ^ (m.mtime_nsec() as u64).rotate_left(20);
                let changed = (m.ctime() as u64) ^ (m.ctime_nsec() as u64).rotate_left(20);
                times ^ changed.rotate_left(13) ^ m.ino().rotate_left(29) ^ m.len().rotate_left(43)
            })
            .fold(0u64, |acc, x| acc.rotate_left(7) ^ x);
        TlsFiles { ca_file, cert_file, key_file, stamp, ca_file_refused: false }
    }
}

/// The largest certificate or key file read; a CA bundle may be larger (the system's is about
/// 200 kB).
const MAX_FILE_BYTES: u64 = 1 << 20;
const MAX_CA_FILE_BYTES: u64 = 8 << 20;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The error text for `path`: never the file's contents.
fn describe(path: &Path, what: impl std::fmt::Display) -> String {
    format!("\"{}\": {what}", path.display())
}

/// Reads a regular file of at most `max` bytes (not a pipe or a device, which could block or
/// never end: the settings are checked in the postmaster too).
fn read_file(path: &Path, max: u64) -> Result<(std::fs::Metadata, Vec<u8>), String> {
    let meta = std::fs::metadata(path).map_err(|e| describe(path, format!("could not read it: {e}")))?;
    if !meta.is_file() {
        return Err(describe(path, "is not a regular file"));
    }
    if meta.len() > max {
        return Err(describe(path, format!("is larger than {max} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| describe(path, format!("could not read it: {e}")))?;
    Ok((meta, bytes))
}

fn read_certificates(path: &Path, max: u64) -> Result<Vec<CertificateDer<'static>>, String> {
    let (_, bytes) = read_file(path, max)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| describe(path, pem_error(e)))?;
    if certs.is_empty() {
        return Err(describe(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let (meta, bytes) = read_file(path, MAX_FILE_BYTES)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            describe(path, "holds no PEM private key (-----BEGIN PRIVATE KEY-----)")
        }
        e => describe(path, pem_error(e)),
    })?;
    provider().key_provider.load_private_key(key.clone_key()).map_err(|e| describe(path, e))?;
    // Postgres' own rule for its ssl_key_file: no access for others, and for the group only
    // when root owns the file.
    let mode = meta.mode() & 0o777;
    if mode & 0o007 != 0 || (mode & 0o070 != 0 && meta.uid() != 0) || mode & 0o030 != 0 {
        return Err(describe(
            path,
            format!("is accessible to others (mode {mode:04o}): make it 0600, or 0640 owned by root"),
        ));
    }
    Ok(key)
}

/// A PEM error, without the bytes it was about.
fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(e) => format!("could not read it: {e}"),
        Error::NoItemsFound => "holds no PEM data".into(),
        Error::MissingSectionEnd { .. } | Error::IllegalSectionStart { .. } | Error::Base64Decode(_) => {
            "is not valid PEM".into()
        }
        _ => "is not valid PEM".into(),
    }
}

/// The roots a broker's certificate must chain to.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certificates(path, MAX_CA_FILE_BYTES)? {
                store
                    .add(cert)
                    .map_err(|e| describe(path, format!("holds an unusable CA certificate: {e}")))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(format!(
                    "the system has no trusted root certificates{why}; set outbox.amqp_tls_ca_file"
                ));
            }
        }
    }
    Ok(store)
}

/// Checks `outbox.amqp_tls_ca_file`: readable, and every certificate in it usable as a root.
pub fn check_ca_file(path: &Path) -> Result<(), String> {
    roots(Some(path)).map(drop)
}

/// Checks `outbox.amqp_tls_cert_file`: readable, with at least one certificate.
pub fn check_cert_file(path: &Path) -> Result<(), String> {
    read_certificates(path, MAX_FILE_BYTES).map(drop)
}

/// Checks `outbox.amqp_tls_key_file`: readable, with a private key of a supported kind.
pub fn check_key_file(path: &Path) -> Result<(), String> {
    read_key(path).map(drop)
}

/// The TLS set-up for a connection to `host` (the name the certificate must carry). Reads the
/// files now, so a connection after they were replaced uses the new ones.
pub fn adaptor(files: &TlsFiles, host: &str) -> Result<TlsAdaptor, String> {
    match (&files.cert_file, &files.key_file) {
        (Some(_), None) => {
            return Err("outbox.amqp_tls_cert_file is set but outbox.amqp_tls_key_file is not".into())
        }
        (None, Some(_)) => {
            return Err("outbox.amqp_tls_key_file is set but outbox.amqp_tls_cert_file is not".into())
        }
        _ => {}
    }
    if files.ca_file_refused {
        return Err("the value configured for outbox.amqp_tls_ca_file was refused (see the server log): \
                    not falling back to the system's roots"
            .into());
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(files.ca_file.as_deref())?);
    let config = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certificates(cert, MAX_FILE_BYTES)?, read_key(key)?)
            .map_err(|e| format!("the client certificate and key cannot be used together: {e}"))?,
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsAdaptor::new(tokio_rustls::TlsConnector::from(Arc::new(config)), host.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in a directory of this test process (named after its pid: `script/test` removes
    /// those of processes that are gone).
    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pg_outbox_tls_unit_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_missing_file_is_named_with_the_reason() {
        let e = check_ca_file(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem") && e.contains("could not read"), "{e}");
    }

    #[test]
    fn a_file_without_certificates_is_refused_without_echoing_it() {
        let path = temp_file("not-pem.txt", "secret-looking text");
        for e in [check_ca_file(&path).unwrap_err(), check_cert_file(&path).unwrap_err()] {
            assert!(e.contains("no PEM certificate"), "{e}");
            assert!(!e.contains("secret-looking"), "{e}");
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = check_key_file(&path).unwrap_err();
        assert!(e.contains("no PEM private key") && !e.contains("secret-looking"), "{e}");
    }

    #[test]
    fn a_certificate_and_key_go_together() {
        let cert_only = TlsFiles { cert_file: Some("/c".into()), ..TlsFiles::default() };
        let e = adaptor(&cert_only, "h").err().unwrap();
        assert!(e.contains("outbox.amqp_tls_cert_file is set but"), "{e}");
        let key_only = TlsFiles { key_file: Some("/k".into()), ..TlsFiles::default() };
        let e = adaptor(&key_only, "h").err().unwrap();
        assert!(e.contains("outbox.amqp_tls_key_file is set but"), "{e}");
    }

    #[test]
    fn files_that_are_not_regular_files_are_refused_without_reading_them() {
        // (A key others may read is refused too: tests/tests/tls.rs, with a real key.)
        let e = check_ca_file(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let e = check_ca_file(&std::env::temp_dir()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_refused_ca_setting_never_falls_back_to_the_system_roots() {
        let files = TlsFiles { ca_file_refused: true, ..TlsFiles::default() };
        let e = adaptor(&files, "h").err().unwrap();
        assert!(e.contains("not falling back"), "{e}");
    }

    #[test]
    fn the_stamp_follows_the_files() {
        let path = temp_file("stamp.pem", "a");
        let before = TlsFiles::new(Some(path.clone()), None, None);
        std::fs::write(&path, "a longer file").unwrap();
        let after = TlsFiles::new(Some(path), None, None);
        assert_ne!(before, after);
    }
}
