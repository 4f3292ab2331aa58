//! Remote management: Cap'n Proto RPC to mgmt over TCP inside TLS 1.3 with a pre-shared key,
//! so that `duplexctl --connect ADDR --key-file FILE` manages a node from another machine (an
//! appliance's console is no place for an operator). The key is the node's `[mgmt] key_file`
//! (32 random bytes, written as 64 hex digits); both ends prove it in the handshake (TLS 1.3
//! external PSK, `psk_dhe_ke`: a fresh ECDHE share per connection, so a key learned later does
//! not open recorded sessions). There is no certificate to issue or renew: the same file on the
//! operator's machine and in the node's config is the whole setup. A connection without the key
//! ends in the handshake, before a byte of RPC is read.
//!
//! OpenSSL, as for the fabric's NVMe/TCP TLS (`docs/DECISIONS.md`): rustls has no TLS 1.3
//! external PSKs. The server context is built before mgmt enters its sandbox (OpenSSL reads its
//! configuration file once, then); the key arrives later with mgmt's resources.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use openssl::ssl::{
    Ssl, SslConnector, SslContext, SslMethod, SslOptions, SslVerifyMode, SslVersion,
};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// The one cipher suite: its hash (SHA-256) is the one OpenSSL binds a callback's PSK to.
const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";
/// The longest client identity accepted (it is only logged).
const MAX_IDENTITY: usize = 128;
/// The identity duplexctl presents (informational: the key is what is checked).
pub const CLIENT_IDENTITY: &str = "duplexctl";

/// The remote management key: 32 bytes.
pub type MgmtKey = [u8; 32];

/// Why the TLS side could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TLS setup: {0}")]
pub struct TlsSetupError(#[from] openssl::error::ErrorStack);

/// Reads a key file: 64 hex digits (surrounding white space ignored).
pub fn read_key(path: &Path) -> Result<MgmtKey, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?;
    parse_key(&text).map_err(|why| format!("the key file {}: {why}", path.display()))
}

/// Parses a key: 64 hex digits.
pub fn parse_key(text: &str) -> Result<MgmtKey, String> {
    let t = text.trim();
    if t.len() != 64 || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "not 64 hexadecimal digits ({} characters; `openssl rand -hex 32` makes a key)",
            t.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(key)
}

/// mgmt's side: one OpenSSL context (TLS 1.3 only, PSK only, no tickets); the key is set once
/// it has been handed over.
pub struct RemoteServer {
    ctx: SslContext,
    key: Arc<OnceLock<MgmtKey>>,
}

impl std::fmt::Debug for RemoteServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteServer")
            .field("keyed", &self.key.get().is_some())
            .finish_non_exhaustive()
    }
}

impl RemoteServer {
    /// The context (before the sandbox).
    pub fn prepare() -> Result<Self, TlsSetupError> {
        openssl::init();
        let key: Arc<OnceLock<MgmtKey>> = Arc::new(OnceLock::new());
        let mut b = SslContext::builder(SslMethod::tls_server())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_ciphersuites(CIPHER_SUITE)?;
        // No resumption: every connection proves the key afresh.
        b.set_num_tickets(0)?;
        b.set_options(SslOptions::NO_TICKET);
        let known = Arc::clone(&key);
        b.set_psk_server_callback(move |_, identity, out| {
            let fits = identity.is_some_and(|i| !i.is_empty() && i.len() <= MAX_IDENTITY);
            match known.get() {
                Some(k) if fits && k.len() <= out.len() => {
                    out[..k.len()].copy_from_slice(k);
                    Ok(k.len())
                }
                // No key (yet) or a bad identity: the handshake fails.
                _ => Ok(0),
            }
        });
        Ok(Self {
            ctx: b.build(),
            key,
        })
    }

    /// Sets the key (once; a second call keeps the first).
    pub fn set_key(&self, key: MgmtKey) {
        let _ = self.key.set(key);
    }

    /// Whether the key was set.
    pub fn keyed(&self) -> bool {
        self.key.get().is_some()
    }

    /// Runs the server side of the handshake on `tcp`: the TLS stream, or why it failed (one
    /// line).
    pub async fn accept(&self, tcp: TcpStream) -> Result<SslStream<TcpStream>, String> {
        let ssl = Ssl::new(&self.ctx).map_err(|e| format!("TLS session: {e}"))?;
        let mut stream = SslStream::new(ssl, tcp).map_err(|e| format!("TLS session: {e}"))?;
        Pin::new(&mut stream)
            .accept()
            .await
            .map_err(|e| format!("TLS handshake failed (wrong or no key?): {}", describe(&e)))?;
        Ok(stream)
    }
}

/// The client side: a TCP connection to `addr` and the TLS handshake with `key`.
pub async fn connect(addr: &str, key: &MgmtKey) -> Result<SslStream<TcpStream>, Failure> {
    let tcp = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    let _ = tcp.set_nodelay(true);
    let setup = |e: openssl::error::ErrorStack| Failure::Handshake(format!("setup: {e}"));
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(setup)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))
        .map_err(setup)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))
        .map_err(setup)?;
    b.set_ciphersuites(CIPHER_SUITE).map_err(setup)?;
    // The node proves the key, never a certificate: a server that ignores the PSK and offers
    // a certificate instead (anyone at the node's address) is refused.
    b.set_verify_callback(SslVerifyMode::PEER, |_, _| false);
    let key = *key;
    b.set_psk_client_callback(move |_, _hint, id_out, key_out| {
        let id = CLIENT_IDENTITY.as_bytes();
        if id.len() + 1 > id_out.len() || key.len() > key_out.len() {
            return Ok(0);
        }
        id_out[..id.len()].copy_from_slice(id);
        id_out[id.len()] = 0;
        key_out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let connector = b.build();
    let mut config = connector.configure().map_err(setup)?;
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(false);
    let ssl = config.into_ssl("").map_err(setup)?;
    let mut stream = SslStream::new(ssl, tcp).map_err(setup)?;
    Pin::new(&mut stream)
        .connect()
        .await
        .map_err(|e| match e.ssl_error() {
            Some(stack) if !stack.errors().is_empty() => Failure::Handshake(describe(&e)),
            _ => Failure::Dropped(describe(&e)),
        })?;
    // TLS 1.3 marks a handshake that used the offered PSK as a resumption: anything else did
    // not prove the key.
    if !stream.ssl().session_reused() {
        return Err(Failure::Handshake(
            "the server did not prove the key (no PSK in its handshake)".into(),
        ));
    }
    Ok(stream)
}

/// Why a remote connection failed.
#[derive(Debug)]
pub enum Failure {
    /// The TCP connection.
    Connect(std::io::Error),
    /// The TLS handshake failed (a wrong key, or not a management port).
    Handshake(String),
    /// The connection ended during the handshake (mgmt restarting, or not a TLS port).
    Dropped(String),
}

/// An OpenSSL handshake error in a line.
fn describe(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) if !stack.errors().is_empty() => stack
            .errors()
            .iter()
            .map(|x| x.reason().unwrap_or("unknown").to_owned())
            .collect::<Vec<_>>()
            .join("; "),
        _ => match e.io_error() {
            Some(io) => io.to_string(),
            None => "the peer closed the connection".to_owned(),
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_64_hex_digits() {
        let k = parse_key(&format!("  {}\n", "0a".repeat(32))).unwrap();
        assert_eq!(k, [0x0a; 32]);
        for bad in ["", "0a", &"0a".repeat(33), &"zz".repeat(32)] {
            let e = parse_key(bad).unwrap_err();
            assert!(e.contains("64 hexadecimal digits"), "{e}");
        }
    }
}
