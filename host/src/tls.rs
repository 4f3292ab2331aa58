//! The host's side of the NVMe/TCP secure channel: a TLS 1.3 handshake with a PSK before
//! ICReq ([`crate::Queue::dial_tls`]). The TLS PSK and identity are derived from the host's
//! configured PSK (`NVMeTLSkey-1:01:...`) for one host and subsystem (`duplex_nvme::tls`).

use std::io::{Read, Write};
use std::net::TcpStream;

use duplex_nvme::tls::{self, ConfiguredKey, Identity, PskHash, TlsKeyError, Variant};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};

use crate::{HostError, Result};

/// What a host presents on a TLS queue: the identity and the TLS PSK it names.
#[derive(Clone)]
pub struct TlsPsk {
    /// The PSK identity.
    pub identity: String,
    /// The TLS PSK.
    pub psk: Vec<u8>,
}

impl std::fmt::Debug for TlsPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPsk")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl TlsPsk {
    /// The identity (`version` 0: `NVMe0R01 host sub`; 1: with the digest) and TLS PSK of
    /// `configured` for `hostnqn` on `subnqn`, derived as `variant` says.
    pub fn derive(
        configured: &str,
        hostnqn: &str,
        subnqn: &str,
        version: u8,
        variant: Variant,
    ) -> std::result::Result<Self, TlsKeyError> {
        let key = ConfiguredKey::parse(configured)?;
        let hash = key.psk_hash();
        let retained = key.retained(hostnqn, variant);
        let id = Identity {
            version,
            hash,
            hostnqn: hostnqn.to_owned(),
            subnqn: subnqn.to_owned(),
            digest: (version == 1).then(|| tls::digest(hash, &retained, hostnqn, subnqn)),
        };
        Ok(Self {
            psk: tls::tls_psk(&id, &retained, variant),
            identity: id.to_text(),
        })
    }

    /// The cipher suite of the PSK's hash.
    fn suite(&self) -> &'static str {
        if self.psk.len() == PskHash::Sha384.digest_len() {
            "TLS_AES_256_GCM_SHA384"
        } else {
            "TLS_AES_128_GCM_SHA256"
        }
    }
}

/// A queue's byte stream: plain TCP or TLS over it.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Tls(Box<openssl::ssl::SslStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket under it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Runs the client side of the handshake on `tcp` with `psk`.
pub(crate) fn handshake(tcp: TcpStream, psk: &TlsPsk) -> Result<Stream> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| HostError::Unexpected(format!("TLS {what}: {e}"));
    let mut b = SslConnector::builder(SslMethod::tls_client()).map_err(|e| fail("setup", &e))?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))
        .map_err(|e| fail("setup", &e))?;
    b.set_ciphersuites(psk.suite())
        .map_err(|e| fail("setup", &e))?;
    b.set_verify(SslVerifyMode::NONE);
    let (identity, key) = (psk.identity.clone(), psk.psk.clone());
    b.set_psk_client_callback(move |_, _hint, id_out, key_out| {
        let id = identity.as_bytes();
        if id.len() + 1 > id_out.len() || key.len() > key_out.len() {
            return Ok(0);
        }
        id_out[..id.len()].copy_from_slice(id);
        id_out[id.len()] = 0;
        key_out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let connector = b.build();
    let mut config = connector.configure().map_err(|e| fail("setup", &e))?;
    config.set_verify_hostname(false);
    config.set_use_server_name_indication(false);
    let stream = config
        .connect("", tcp)
        .map_err(|e| fail("handshake refused or failed", &e))?;
    Ok(Stream::Tls(Box::new(stream)))
}
