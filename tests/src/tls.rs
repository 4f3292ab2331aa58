//! OpenSSL's own TLS client as an independent peer of the NVMe/TCP secure channel.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use duplex_host::tls::TlsPsk;
use duplex_nvme::tcp;

/// What `openssl s_client` (TLS 1.3, TLS_AES_128_GCM_SHA256, the identity and TLS PSK of `p`)
/// receives from `addr` for an ICReq sent through the channel: the target's 128-byte ICResp,
/// or less (nothing when the handshake is refused).
pub fn s_client_icresp(addr: SocketAddr, p: &TlsPsk) -> Vec<u8> {
    let hex: String = p.psk.iter().map(|x| format!("{x:02x}")).collect();
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-tls1_3",
            "-quiet",
        ])
        .args(["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
        .args(["-psk", &hex, "-psk_identity", &p.identity])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client (package openssl)");
    let icreq = tcp::IcReq {
        pfv: 0,
        hpda: 0,
        digests: tcp::Digests::default(),
        maxr2t: 0,
    };
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(&icreq.encode()).expect("ICReq to s_client");
    stdin.flush().expect("flush");
    let mut out = child.stdout.take().expect("stdout");
    let mut got = vec![0u8; 128];
    let mut n = 0;
    while n < got.len() {
        match out.read(&mut got[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    got.truncate(n);
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    got
}
