//! Google service accounts with domain-wide delegation: the JWT bearer grant (RFC 7523 §2.1)
//! whose assertion is signed with the key file's RS256 private key
//! (developers.google.com/identity/protocols/oauth2/service-account, "Preparing to make an
//! authorized API call"). Called by the token source before each token request of an account
//! with `grant: service_account`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::json;

use super::TokenError;

/// The `grant_type` of the JWT bearer grant (RFC 7523 §2.1).
pub const JWT_BEARER_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// How long an assertion is valid, in seconds: Google accepts at most an hour.
pub const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// A service account's JSON key file, as the Google Cloud console downloads it.
#[derive(Deserialize)]
pub struct ServiceAccountKey {
    /// The service account's e-mail: the assertion's `iss`.
    pub client_email: String,
    /// The RSA private key, PKCS#8 PEM. Never printed.
    private_key: SecretString,
    /// The key's id, sent as the JWT header's `kid`.
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// The token endpoint the key was issued for: the assertion's `aud`.
    #[serde(default)]
    pub token_uri: Option<String>,
}

impl std::fmt::Debug for ServiceAccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountKey")
            .field("client_email", &self.client_email)
            .finish_non_exhaustive()
    }
}

impl ServiceAccountKey {
    /// Reads the key file at `path`.
    ///
    /// # Errors
    /// [`TokenError::KeyFile`] naming the file and what is wrong (never the key).
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read(path).map_err(|error| {
            TokenError::KeyFile(format!("cannot read {}: {error}", path.display()))
        })?;
        serde_json::from_slice(&text).map_err(|error| {
            TokenError::KeyFile(format!(
                "{} is not a service account key file: {}",
                path.display(),
                // serde's message names the field and the position, never the value.
                error
            ))
        })
    }

    /// A signed assertion (a compact JWS, RFC 7515 §7.1) for `subject` (the mailbox to act as),
    /// with `scope` and audience `token_url`, valid for [`ASSERTION_LIFETIME_SECS`].
    ///
    /// # Errors
    /// [`TokenError::KeyFile`] when the private key is not an RSA PKCS#8 PEM key.
    pub fn assertion(
        &self,
        scope: &str,
        token_url: &str,
        subject: &str,
    ) -> Result<SecretString, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.private_key_id {
            header["kid"] = json!(kid);
        }
        let claims = json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": token_url,
            "sub": subject,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let der = PrivatePkcs8KeyDer::from_pem_slice(self.private_key.expose_secret().as_bytes())
            .map_err(|_| TokenError::KeyFile("private_key is not a PKCS#8 PEM key".into()))?;
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|_| TokenError::KeyFile("private_key is not an RSA key".into()))?;
        let mut signature = vec![0; key.public().modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        )
        .map_err(|_| TokenError::KeyFile("signing the assertion failed".into()))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)).into())
    }
}
