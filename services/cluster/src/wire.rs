//! The interconnect's messages (`schemas/interconnect.capnp`) as owned, validated values, and
//! their frames: a 4-byte little-endian length, then one Cap'n Proto message of at most
//! [`MAX_FRAME`] bytes. Decoding never panics, whatever a peer (or anything else that reaches
//! the interconnect port) sends.

use duplex_schemas::interconnect_capnp as wire;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message (bytes, without the length prefix).
pub const MAX_FRAME: usize = 4096;
/// Longest array name (bytes).
pub const MAX_NAME: usize = 64;
/// Boot numbers are 48 bits (the low bits of a reservation key).
pub const MAX_BOOT: u64 = (1 << 48) - 1;

/// How the sender is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Serving.
    Serving,
    /// Fenced: serves nothing, waits to rejoin with a new boot.
    Fenced,
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// A heartbeat.
    Beat {
        /// Grows by one per beat of a boot, from 1.
        seq: u64,
        /// The sender's state.
        state: NodeState,
        /// The sender's metadata change counter (its pools changed on the drives).
        config_generation: u64,
        /// The sender is fencing the receiver, or took its pools and has not imported them
        /// all yet (the join handshake: a starting receiver waits while it is true).
        takeover_pending: bool,
    },
    /// The sender's cluster service stops on purpose.
    Leaving,
}

/// One interconnect message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The array's name.
    pub cluster: String,
    /// The sender's node id.
    pub node: u16,
    /// The sender's boot number.
    pub boot: u64,
    /// What it says.
    pub body: Body,
}

/// Why bytes are not an interconnect message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame longer than [`MAX_FRAME`].
    #[error("interconnect frame of {0} bytes (at most {MAX_FRAME})")]
    TooLong(usize),
    /// Not a Cap'n Proto message of the schema.
    #[error("interconnect message does not decode: {0}")]
    Decode(String),
    /// Decodes, but a field is out of its bounds.
    #[error("interconnect message is invalid: {0}")]
    Invalid(String),
}

impl Message {
    /// Checks the bounds the schema states.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.cluster.is_empty() || self.cluster.len() > MAX_NAME {
            return Err(WireError::Invalid(format!(
                "array name of {} bytes (1..={MAX_NAME})",
                self.cluster.len()
            )));
        }
        if self.node == 0 {
            return Err(WireError::Invalid("node id 0".into()));
        }
        if self.boot == 0 || self.boot > MAX_BOOT {
            return Err(WireError::Invalid(format!("boot number {}", self.boot)));
        }
        if let Body::Beat { seq: 0, .. } = self.body {
            return Err(WireError::Invalid("beat sequence number 0".into()));
        }
        Ok(())
    }

    /// The frame of a valid message: length prefix, then the message.
    pub fn frame(&self) -> Result<Vec<u8>, WireError> {
        self.validate()?;
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<wire::interconnect::Builder<'_>>();
        root.set_cluster(self.cluster.as_str());
        root.set_node(self.node);
        root.set_boot(self.boot);
        match &self.body {
            Body::Beat {
                seq,
                state,
                config_generation,
                takeover_pending,
            } => {
                let mut b = root.init_body().init_beat();
                b.set_seq(*seq);
                b.set_config_generation(*config_generation);
                b.set_takeover_pending(*takeover_pending);
                b.set_state(match state {
                    NodeState::Serving => wire::NodeState::Serving,
                    NodeState::Fenced => wire::NodeState::Fenced,
                });
            }
            Body::Leaving => root.init_body().set_leaving(()),
        }
        let bytes = capnp::serialize::write_message_to_words(&message);
        if bytes.len() > MAX_FRAME {
            return Err(WireError::TooLong(bytes.len()));
        }
        let mut out = Vec::with_capacity(4 + bytes.len());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&bytes);
        Ok(out)
    }

    /// Decodes and validates one message (a frame without its length prefix).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_FRAME {
            return Err(WireError::TooLong(bytes.len()));
        }
        let mut options = capnp::message::ReaderOptions::new();
        options.traversal_limit_in_words(Some(MAX_FRAME / 8));
        options.nesting_limit(8);
        let mut rest = bytes;
        let message = capnp::serialize::read_message(&mut rest, options)
            .map_err(|e| WireError::Decode(e.to_string()))?;
        if !rest.is_empty() {
            return Err(WireError::Decode(format!("{} trailing bytes", rest.len())));
        }
        let d = |e: capnp::Error| WireError::Decode(e.to_string());
        let root: wire::interconnect::Reader<'_> = message.get_root().map_err(d)?;
        let cluster = root
            .get_cluster()
            .map_err(d)?
            .to_string()
            .map_err(|_| WireError::Invalid("array name is not UTF-8".into()))?;
        let body = match root.get_body().which() {
            Ok(wire::interconnect::body::Beat(b)) => {
                let b = b.map_err(d)?;
                let state = match b.get_state() {
                    Ok(wire::NodeState::Serving) => NodeState::Serving,
                    Ok(wire::NodeState::Fenced) => NodeState::Fenced,
                    Err(e) => return Err(WireError::Invalid(format!("node state: {e}"))),
                };
                Body::Beat {
                    seq: b.get_seq(),
                    state,
                    config_generation: b.get_config_generation(),
                    takeover_pending: b.get_takeover_pending(),
                }
            }
            Ok(wire::interconnect::body::Leaving(())) => Body::Leaving,
            Err(e) => return Err(WireError::Invalid(format!("unknown message: {e}"))),
        };
        let m = Self {
            cluster,
            node: root.get_node(),
            boot: root.get_boot(),
            body,
        };
        m.validate()?;
        Ok(m)
    }
}

/// Reads one frame's message bytes; `Ok(None)` at a clean end of stream (between frames).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            WireError::TooLong(len),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat() -> Message {
        Message {
            cluster: "duplex".into(),
            node: 2,
            boot: 1_700_000_000_000,
            body: Body::Beat {
                seq: 9,
                state: NodeState::Serving,
                config_generation: 4,
                takeover_pending: true,
            },
        }
    }

    #[test]
    fn messages_round_trip_and_bounds_are_checked() {
        for m in [
            beat(),
            Message {
                body: Body::Leaving,
                ..beat()
            },
            Message {
                body: Body::Beat {
                    seq: 1,
                    state: NodeState::Fenced,
                    config_generation: 0,
                    takeover_pending: false,
                },
                ..beat()
            },
        ] {
            let f = m.frame().expect("frame");
            let len = u32::from_le_bytes([f[0], f[1], f[2], f[3]]) as usize;
            assert_eq!(len, f.len() - 4);
            assert_eq!(Message::decode(&f[4..]), Ok(m));
        }
        for bad in [
            Message { node: 0, ..beat() },
            Message { boot: 0, ..beat() },
            Message {
                boot: MAX_BOOT + 1,
                ..beat()
            },
            Message {
                cluster: String::new(),
                ..beat()
            },
            Message {
                cluster: "x".repeat(MAX_NAME + 1),
                ..beat()
            },
            Message {
                body: Body::Beat {
                    seq: 0,
                    state: NodeState::Serving,
                    config_generation: 0,
                    takeover_pending: false,
                },
                ..beat()
            },
        ] {
            assert!(matches!(bad.frame(), Err(WireError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn garbage_never_panics_and_is_refused() {
        let good = beat().frame().expect("frame");
        let body = &good[4..];
        // Every truncation, every single-byte corruption: an error or a valid message.
        for cut in 0..body.len() {
            let _ = Message::decode(&body[..cut]);
        }
        for i in 0..body.len() {
            for v in [0x00, 0xFF, 0x80, 0x01] {
                let mut b = body.to_vec();
                b[i] = v;
                if let Ok(m) = Message::decode(&b) {
                    assert!(m.validate().is_ok());
                }
            }
        }
        assert!(Message::decode(&[0u8; MAX_FRAME + 1]).is_err());
        let mut trailing = body.to_vec();
        trailing.extend_from_slice(&[0; 8]);
        assert!(Message::decode(&trailing).is_err());
    }
}
