//! The node's one TLS stack: rustls with ring as its crypto provider.
//!
//! ring is already in the build (libp2p's noise handshake uses it), so
//! HTTPS webhooks add no second crypto library. reqwest built without a
//! provider of its own takes the process-wide rustls default, and refuses
//! to build a client while none is installed: every HTTP client of this
//! crate, its tests and its examples starts from [`http_client`], which
//! installs ring first.

use std::sync::Once;

/// Installs ring as the process's rustls crypto provider, unless the
/// program installed one of its own before (which is then kept).
pub fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // An error means a provider is installed already: that one serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A reqwest client builder that can build: the crypto provider is in place.
#[allow(clippy::disallowed_methods, reason = "the one place that may")]
pub fn http_client() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

/// Whether `error`, or any error it was caused by, is a TLS failure (a
/// certificate that does not verify, a refused client certificate, a
/// handshake alert), so a failed call can say so rather than only "error
/// sending request".
pub fn is_tls_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    causes(error).any(|e| e.is::<rustls::Error>())
}

/// `error` and every error it was caused by, joined with `: `, so a
/// failure names its root cause (reqwest's own message does not).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for e in causes(error) {
        let next = e.to_string();
        if !text.ends_with(&next) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&next);
        }
    }
    text
}

/// `error`, then what caused it, and so on. An `io::Error` that wraps
/// another error hides it from `source()` (and shows its text as its own),
/// so the walk steps into it: TLS failures arrive as rustls errors wrapped
/// in two layers of `io::Error`.
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| {
        match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        }
    })
}
