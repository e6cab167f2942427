//! TLS to the broker (rustls, with the *ring* provider): roots from a CA file or the system,
//! and an optional client certificate. The database side uses sqlx's own rustls support
//! (see [`crate::store::connect_options`]).

use std::path::Path;
use std::sync::Once;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::{ConfigError, MqttTls};

/// Makes *ring* the process's rustls provider (once), so every rustls user agrees on one.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when another provider was installed first: then that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn certs(path: &Path, var: &'static str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bad = |problem: String| ConfigError {
        var: var.into(),
        problem,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("{} is not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(bad(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

/// The rustls client configuration for the broker; errors name the variable at fault.
pub fn mqtt_client_config(tls: &MqttTls) -> Result<ClientConfig, ConfigError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(path) => {
            for cert in certs(path, "MQTT_TLS_CA_FILE")? {
                roots.add(cert).map_err(|e| ConfigError {
                    var: "MQTT_TLS_CA_FILE".into(),
                    problem: format!("{}: {e}", path.display()),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(ConfigError {
                    var: "MQTT_TLS_CA_FILE".into(),
                    problem: "no system CA certificates found: set it to the broker's CA".into(),
                });
            }
        }
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match &tls.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert, "MQTT_TLS_CERT_FILE")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ConfigError {
                var: "MQTT_TLS_KEY_FILE".into(),
                problem: format!("{} is not a PEM private key: {e}", key.display()),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ConfigError {
                    var: "MQTT_TLS_CERT_FILE".into(),
                    problem: format!("cannot use it with MQTT_TLS_KEY_FILE: {e}"),
                })?
        }
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_files_name_their_variable() {
        let dir = std::env::temp_dir().join(format!("mi-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = mqtt_client_config(&MqttTls {
            ca_file: Some(empty.clone()),
            client_cert: None,
        })
        .unwrap_err();
        assert_eq!(e.var, "MQTT_TLS_CA_FILE");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
