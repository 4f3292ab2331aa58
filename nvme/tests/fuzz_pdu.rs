//! Fuzz targets for the wire parsers: NVMe/TCP headers and PDUs, and the command structures
//! a host controls (Connect data, Get Log Page fields, SGLs, log windows).
//!
//! Properties: no parser panics on any input; a header `layout` accepts accounts for every byte
//! of PLEN and respects the data limit; every header the encoder builds is accepted with the
//! data length it was built for.
//!
//! Bounded under `cargo test` (iterations and a time cap below); run longer with
//! `BOLERO_RANDOM_ITERATIONS=… BOLERO_RANDOM_TEST_TIME_MS=… cargo test --release -p duplex-nvme
//! --test fuzz_pdu`, or coverage-guided with `cargo +nightly bolero test … --engine libfuzzer`.

use std::time::Duration;

use duplex_nvme::cmd::{ConnectData, GetLogPage, Sqe};
use duplex_nvme::log;
use duplex_nvme::tcp::{self, CommonHeader, Digests, PduType};

const ITERATIONS: usize = 2_000_000;
/// Wall-clock cap per target (a bound on the run, not an assertion).
const TIME_CAP: Duration = Duration::from_secs(10);

fn digests(b: u8) -> Digests {
    Digests {
        header: b & 1 != 0,
        data: b & 2 != 0,
    }
}

#[test]
fn headers_and_pdus_never_panic_and_layouts_add_up() {
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_max_len(300)
        .for_each(|bytes: &[u8]| {
            if bytes.len() < tcp::CH_LEN + 2 {
                return;
            }
            let (ctl, rest) = bytes.split_at(2);
            let mut ch = [0u8; tcp::CH_LEN];
            ch.copy_from_slice(&rest[..tcp::CH_LEN]);
            let c = CommonHeader::parse(&ch);
            let d = digests(ctl[0]);
            let from_host = ctl[0] & 4 != 0;
            let max = usize::from(ctl[1]) * 1024;
            if let Ok(l) = tcp::layout(&c, d, from_host, max) {
                let dd = if l.data_digest { tcp::DIGEST_LEN } else { 0 };
                assert_eq!(tcp::CH_LEN + l.head_rest() + l.data_len + dd, l.plen);
                assert_eq!(l.plen, c.plen as usize);
                assert_eq!(l.hlen, l.pdu_type.hlen());
                let control = matches!(
                    l.pdu_type,
                    PduType::IcReq | PduType::IcResp | PduType::H2CTermReq | PduType::C2HTermReq
                );
                assert!(control || l.data_len <= max);
            }
            // Whatever follows, as a whole PDU of each kind.
            let _ = tcp::IcReq::parse(rest);
            let _ = tcp::IcResp::parse(rest);
            let _ = tcp::parse_data_header(rest);
            let _ = tcp::parse_r2t(rest);
            let _ = tcp::parse_term_req(rest);
            let _ = ConnectData::parse(rest);
        });
}

#[test]
fn command_fields_never_panic() {
    bolero::check!()
        .with_iterations(ITERATIONS)
        .with_test_time(TIME_CAP)
        .with_type::<([u8; 64], u64, u16)>()
        .for_each(|input: &([u8; 64], u64, u16)| {
            let (raw, offset, len) = input;
            let sqe = Sqe::from_bytes(raw);
            let _ = (
                sqe.sgl(),
                sqe.slba(),
                sqe.nlb(),
                sqe.fua(),
                sqe.fctype(),
                sqe.psdt(),
            );
            let g = GetLogPage::from_sqe(&sqe);
            assert!(g.len >= 4 && g.len % 4 == 0);
            let page = vec![7u8; usize::from(*len % 5000)];
            if let Some(w) = log::window(&page, *offset, usize::from(*len)) {
                assert_eq!(w.len(), usize::from(*len));
            }
        });
}

#[test]
fn every_encoded_header_is_accepted() {
    bolero::check!()
        .with_iterations(ITERATIONS / 4)
        .with_test_time(TIME_CAP)
        .with_type::<(u8, u8, u16, u8)>()
        .for_each(|input: &(u8, u8, u16, u8)| {
            let (kind, dg, len, align) = *input;
            let d = digests(dg);
            let t = match kind % 3 {
                0 => PduType::CapsuleCmd,
                1 => PduType::H2CData,
                _ => PduType::C2HData,
            };
            let data_len = if t == PduType::CapsuleCmd {
                usize::from(len)
            } else {
                usize::from(len).max(1)
            };
            let head = match t {
                PduType::CapsuleCmd => tcp::capsule_cmd(&Sqe::default(), data_len, d, align % 32),
                _ => tcp::data_pdu(
                    t,
                    &tcp::DataHeader {
                        cccid: 1,
                        ttag: 2,
                        datao: 0,
                        datal: data_len as u32,
                    },
                    tcp::FLAG_DATA_LAST,
                    d,
                    align % 32,
                ),
            };
            let mut ch = [0u8; tcp::CH_LEN];
            ch.copy_from_slice(&head[..tcp::CH_LEN]);
            let l = tcp::layout(&CommonHeader::parse(&ch), d, t.from_host(), 1 << 20)
                .expect("an encoded header is valid");
            assert_eq!(l.data_len, data_len);
            assert_eq!(tcp::CH_LEN + l.head_rest(), head.len());
        });
}
