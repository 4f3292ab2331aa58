//! The secure channel (NVMe/TCP Transport Specification 1.0c §3.6, TP 8018): on a listener
//! with `tls = true`, every connection opens with a TLS 1.3 handshake keyed by a pre-shared key,
//! before ICReq; a connection that does not (a plain ICReq, a wrong key, no key for the host) is
//! closed and counted.
//!
//! The host presents a PSK identity, `NVMe0R0H <hostnqn> <subnqn>` or `NVMe1R0H <hostnqn>
//! <subnqn> <digest>`; the target finds the host's configured PSK (`duplexctl host allow
//! --tls-psk`, kept sealed in the export table like DH-HMAC-CHAP secrets), derives the retained
//! PSK and the TLS PSK from it (`duplex_nvme::tls`) and hands that to OpenSSL. A version 1
//! identity's digest must be the one of the key the target holds (else another key: refused);
//! it also says which HKDF-Expand-Label the host computed (the specification's, or libnvme's
//! before 1.16), so both kinds of host connect; a version 0 identity gets the specification's.
//! After the handshake the queue remembers the identity: its Connect must name the same host
//! and subsystem (or the discovery subsystem), so a host keyed for one subsystem cannot use the
//! channel for another.
//!
//! OpenSSL's PSK callbacks (the pre-TLS 1.3 interface, which OpenSSL maps onto TLS 1.3) give
//! the SHA-256 cipher suite only: SHA-384 PSKs (`NVMeTLSkey-1:02:`, TLS_AES_256_GCM_SHA384) are
//! refused with a log line saying so (docs/DECISIONS.md).

use std::net::SocketAddr;
use std::pin::Pin;

use duplex_nvme::tls::{self, ConfiguredKey, Identity, PskHash, Variant};
use duplex_ondisk::secrets::SecretsKey;
use openssl::ex_data::Index;
use openssl::ssl::{Ssl, SslContext, SslMethod, SslOptions, SslVersion};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::target::Target;

/// The TLS 1.3 cipher suite of SHA-256 PSKs (the only one OpenSSL's PSK callbacks negotiate).
pub const CIPHER_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// Why a TLS server cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct TlsSetupError(#[from] openssl::error::ErrorStack);

/// The hosts' sealed keys a handshake may use: a copy taken when the connection arrives.
#[derive(Debug)]
struct PskLookup {
    key: Option<SecretsKey>,
    /// (subsystem, host, sealed keys).
    sealed: Vec<(String, String, Vec<u8>)>,
    discovery_nqn: String,
}

/// What the handshake's PSK lookup found.
#[derive(Debug, Clone, Default)]
struct Lookup {
    identity: Option<Identity>,
    refused: Option<String>,
}

impl PskLookup {
    /// The TLS PSK for `identity`, or why not.
    fn find(&self, identity: Option<&[u8]>) -> Result<(Identity, Vec<u8>), String> {
        let text = identity
            .and_then(|i| std::str::from_utf8(i).ok())
            .ok_or("no PSK identity, or not text")?;
        let id = Identity::parse(text).map_err(|e| format!("PSK identity {text:?}: {e}"))?;
        if id.hash != PskHash::Sha256 {
            return Err(format!(
                "PSK identity {text:?} asks for a SHA-384 PSK (TLS_AES_256_GCM_SHA384): only \
                 SHA-256 PSKs are supported (NVMeTLSkey-1:01:)"
            ));
        }
        let key = self
            .key
            .as_ref()
            .ok_or("this node has no secrets key ([secrets] key_file): no TLS PSK can be read")?;
        // On the discovery subsystem a host uses a key it has on any subsystem.
        let candidates = self.sealed.iter().filter(|(sub, host, _)| {
            *host == id.hostnqn && (*sub == id.subnqn || id.subnqn == self.discovery_nqn)
        });
        let mut why = format!(
            "no TLS PSK for host {} on subsystem {}",
            id.hostnqn, id.subnqn
        );
        for (sub, host, sealed) in candidates {
            let keys = match duplex_ondisk::secrets::unseal(key, sub, host, sealed) {
                Ok(k) => k,
                Err(e) => {
                    why = format!("the host's keys cannot be unsealed: {e}");
                    continue;
                }
            };
            let Some(text) = keys.tls_psk else { continue };
            let configured = match ConfiguredKey::parse(&text) {
                Ok(k) => k,
                Err(e) => {
                    why = format!("the host's stored TLS PSK is unusable: {e}");
                    continue;
                }
            };
            if configured.psk_hash() != id.hash {
                why = "the host's TLS PSK is a SHA-384 key; its identity asks for SHA-256".into();
                continue;
            }
            // A version 0 identity carries nothing to tell the derivations apart: the
            // specification's is used. A version 1 identity's digest says which one the host
            // computed (libnvme before 1.16 computed the other).
            let Some(d) = &id.digest else {
                let retained = configured.retained(&id.hostnqn, Variant::Rfc);
                let psk = tls::tls_psk(&id, &retained, Variant::Rfc);
                return Ok((id, psk));
            };
            for variant in [Variant::Rfc, Variant::Compat] {
                let retained = configured.retained(&id.hostnqn, variant);
                if *d == tls::digest(id.hash, &retained, &id.hostnqn, &id.subnqn) {
                    let psk = tls::tls_psk(&id, &retained, variant);
                    return Ok((id, psk));
                }
            }
            why = "the identity's digest is not the one of the host's key (another PSK)".into();
        }
        Err(why)
    }
}

/// The target's TLS side: one OpenSSL context (TLS 1.3 only, PSK only, no tickets), built
/// before the sandbox (OpenSSL reads its configuration file then).
pub struct TlsServer {
    ctx: SslContext,
    lookup: Index<Ssl, PskLookup>,
    found: Index<Ssl, Lookup>,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer").finish_non_exhaustive()
    }
}

/// A finished handshake: the stream and the identity the host proved.
#[derive(Debug)]
pub struct Accepted {
    /// The TLS stream.
    pub stream: SslStream<TcpStream>,
    /// The host's PSK identity.
    pub identity: Identity,
}

impl TlsServer {
    /// The context.
    pub fn new() -> Result<Self, TlsSetupError> {
        openssl::init();
        let lookup = Ssl::new_ex_index::<PskLookup>()?;
        let found = Ssl::new_ex_index::<Lookup>()?;
        let mut b = SslContext::builder(SslMethod::tls_server())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
        b.set_ciphersuites(CIPHER_SUITE)?;
        // No resumption: every connection proves the PSK afresh.
        b.set_num_tickets(0)?;
        b.set_options(SslOptions::NO_TICKET);
        b.set_psk_server_callback(move |ssl, identity, out| {
            let result = match ssl.ex_data(lookup) {
                Some(l) => l.find(identity),
                None => Err("no key table".to_owned()),
            };
            match result {
                Ok((id, psk)) if psk.len() <= out.len() => {
                    out[..psk.len()].copy_from_slice(&psk);
                    ssl.set_ex_data(
                        found,
                        Lookup {
                            identity: Some(id),
                            refused: None,
                        },
                    );
                    Ok(psk.len())
                }
                Ok(_) => Ok(0),
                Err(why) => {
                    ssl.set_ex_data(
                        found,
                        Lookup {
                            identity: None,
                            refused: Some(why),
                        },
                    );
                    // No key: the handshake fails (unknown PSK identity).
                    Ok(0)
                }
            }
        });
        Ok(Self {
            ctx: b.build(),
            lookup,
            found,
        })
    }

    /// Runs the server side of the handshake on `tcp`; the identity, or why it failed.
    pub async fn accept(&self, target: &Target, tcp: TcpStream) -> Result<Accepted, String> {
        let mut sealed = Vec::new();
        for s in target.subsystems() {
            for (host, blob) in s.all_sealed_secrets() {
                sealed.push((s.nqn.clone(), host, blob));
            }
        }
        let lookup = PskLookup {
            key: target.secrets_key().cloned(),
            sealed,
            discovery_nqn: target.discovery.nqn.clone(),
        };
        let mut ssl = Ssl::new(&self.ctx).map_err(|e| format!("TLS session: {e}"))?;
        ssl.set_ex_data(self.lookup, lookup);
        let mut stream = SslStream::new(ssl, tcp).map_err(|e| format!("TLS session: {e}"))?;
        let done = Pin::new(&mut stream).accept().await;
        let found = stream
            .ssl()
            .ex_data(self.found)
            .cloned()
            .unwrap_or_default();
        match (done, found.identity) {
            (Ok(()), Some(identity)) => Ok(Accepted { stream, identity }),
            (Ok(()), None) => Err("TLS handshake without a PSK identity".into()),
            (Err(e), _) => Err(match found.refused {
                Some(why) => format!("TLS handshake refused: {why}"),
                None => format!("TLS handshake failed: {}", describe(&e)),
            }),
        }
    }
}

/// An OpenSSL handshake error in a line (a plain NVMe/TCP ICReq shows as "wrong version
/// number" or "record layer failure").
fn describe(e: &openssl::ssl::Error) -> String {
    match e.ssl_error() {
        Some(stack) => stack
            .errors()
            .iter()
            .map(|x| x.reason().unwrap_or("unknown").to_owned())
            .collect::<Vec<_>>()
            .join("; "),
        None => e.to_string(),
    }
}

/// Whether a queue's Connect fits the identity its TLS channel proved: the same host, and the
/// same subsystem or the discovery subsystem.
pub fn connect_fits(identity: &Identity, hostnqn: &str, subnqn: &str, discovery: &str) -> bool {
    identity.hostnqn == hostnqn && (identity.subnqn == subnqn || subnqn == discovery)
}

/// Logs (rate limited), counts and reports (a `host-refused` event, rate limited) a connection
/// refused on a TLS listener.
pub fn refused(target: &Target, shared: &crate::queue::Shared, peer: SocketAddr, why: &str) {
    let msg = format!("connection refused on a TLS listener: {why}");
    shared.warn(peer, &msg);
    target.count_host(true, "tls");
    target.host_event(
        duplex_ipc::control::EventLevel::Warning,
        "host-refused",
        &format!("{msg} (from {peer})"),
    );
}
