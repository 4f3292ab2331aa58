# The interconnect: cluster service <-> cluster service of the peer node.
#
# One TCP connection per direction: each node's cluster service listens on its interconnect
# address (a network of its own, not the hosts') and dials the peer's, and sends on the
# connection it dialled; it reads what arrives on the ones it accepted. Every message is one
# frame: a 4-byte little-endian length, then that many bytes of one message in the standard
# (unpacked) Cap'n Proto stream framing, at most 4096 bytes. A frame that is longer, does not
# decode, names another cluster or a node id that is not the configured peer's, closes that
# connection (rate-limited log); the dialler reconnects.
#
# Heartbeats: a beat every beat interval; the peer counts the link silent once no beat arrived
# for the dead time (services/cluster/src/membership.rs). A beat carries the sender's boot
# number (its reservation key is node id << 48 | boot), so a rebooted peer is told apart.
#
# Compatibility: as lifecycle.capnp (append only; unknown members and enumerants are rejected).

@0xbe8d83c364da8c0c;

struct Interconnect {
  cluster @0 :Text;
  # The array's name (1..=64 bytes): two arrays wired to one another by mistake refuse each other.

  node @1 :UInt16;
  # The sender's node id (1..=65535).

  boot @2 :UInt64;
  # The sender's boot number (1..2^48).

  body :union {
    beat @3 :Beat;

    leaving @4 :Void;
    # The sender's cluster service stops on purpose (duplexd stopping): its link goes silent
    # without that meaning anything by itself; its disk heartbeat decides, as for any silence.
  }
}

struct Beat {
  seq @0 :UInt64;
  # Grows by one with every beat of a boot, from 1.

  state @1 :NodeState;
  # How the sender is.

  configGeneration @2 :UInt64;
  # Grows whenever the sender's metadata service changed a pool on the drives (a commit, a
  # move): the receiver's metadata service re-reads the pools it does not own when it moves.

  takeoverPending @3 :Bool;
  # The sender is fencing the receiver's node, or has fenced it and its metadata service has
  # not yet imported every pool it took: the join handshake. A receiver that just started
  # (a new boot) serves none of its own pools until a beat says false, so that it never
  # imports a pool the sender is taking over.
}

enum NodeState {
  serving @0;
  # Serving (its own pools, if any).

  fenced @1;
  # A drive told it its key is gone: it serves nothing and waits to rejoin with a new boot.
}
