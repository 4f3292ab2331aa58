# The reservation channel: fabric -> metadata.
#
# One Unix SOCK_SEQPACKET socket pair, created by the supervisor when the node config has both a
# service named `fabric` and one named `metadata`; each gets its end as the resource `resv`, and
# the supervisor keeps both ends, so the channel outlives the restarts of either. The fabric
# carries a host's Reservation Register, Acquire and Release (and Set Features Reservation
# Persistence) to the metadata service, which applies it to the namespace's reservation state
# kept with the pool on the drives (docs/ONDISK.md record 10), commits, publishes the export
# table, and answers. Holding the fabric's end is the privilege to change reservation state and
# nothing else: no other message travels on it, and no file descriptors do. Every datagram is
# exactly one message in the standard (unpacked) Cap'n Proto stream framing:
#
#   fabric   -> metadata  ResvRequest
#   metadata -> fabric    ResvReply (same requestId)
#
# The fabric sends one request at a time and waits up to 10 s; a reply that comes later is
# discarded by its requestId. A restarted metadata service sends a reply with requestId 0
# (error) so a request its predecessor took is answered at once.
#
# Bounds (both ends enforce them, `duplex_ipc::resv`): NQNs 1..=223 bytes, command data at most
# 16 bytes, at most 64 registrants, notices and aborts at most 128 each, texts at most 4096
# bytes.
#
# Compatibility: as lifecycle.capnp (append only; unknown members and enumerants are rejected).

@0xc5a1f0e2d7b38a46;

struct ResvRequest {
  requestId @0 :UInt64;
  # Sender-chosen, non-zero; the reply echoes it.

  subnqn @1 :Text;
  nsid @2 :UInt32;
  # The namespace, as its subsystem exports it.

  hostId @3 :Data;
  # The host identifier (16 bytes) of the host that sent the command.

  cntlid @4 :UInt16;
  # The controller it came through (0xFFFF: the dynamic controller model's report value).

  body :union {
    register @5 :Command;
    acquire @6 :Command;
    release @7 :Command;
    # The command as the host sent it: dword 10 and the data buffer.

    setPtpl @8 :Bool;
    # Set Features Reservation Persistence (feature 83h), dword 11 bit 0.
  }
}

struct Command {
  cdw10 @0 :UInt32;
  data @1 :Data;
  # At most 16 bytes (Register and Acquire: 16, Release: 8).
}

struct Registrant {
  hostId @0 :Data;
  # 16 bytes.
  key @1 :UInt64;
  cntlid @2 :UInt16;
}

struct ResvState {
  version @0 :UInt64;
  # Bumped by every committed change: a reader takes only a newer one.
  generation @1 :UInt32;
  rtype @2 :UInt8;
  ptpl @3 :Bool;
  holder @4 :Data;
  # 16 bytes, all zero without a single holder.
  registrants @5 :List(Registrant);
}

struct HostCtrl {
  hostId @0 :Data;
  cntlid @1 :UInt16;
}

struct Notice {
  to @0 :HostCtrl;
  kind @1 :UInt8;
  # Reservation Notification log page type: 1 registration preempted, 2 reservation released,
  # 3 reservation preempted.
}

struct ResvReply {
  requestId @0 :UInt64;

  body :union {
    done @1 :Done;
    # The command was carried out (status 0, state committed and published) or refused by the
    # reservation model (status non-zero, nothing changed).

    notOwner @2 :Void;
    # This node does not own the pool of the namespace (the host should use the owner's path).

    error @3 :Text;
    # Not carried out: no such namespace, the commit failed, the service is not ready.
  }
}

struct Done {
  status @0 :UInt16;
  # The NVMe status: Do Not Retry << 14 | status code type << 8 | status code; 0 success.
  state @1 :ResvState;
  # The namespace's state after the command (unchanged on a refusal).
  aborts @2 :List(HostCtrl);
  # Preempt and Abort: the controllers whose outstanding commands the fabric aborts.
  notices @3 :List(Notice);
}
