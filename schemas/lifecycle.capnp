# The service lifecycle channel: supervisor (duplexd) <-> one service.
#
# One Unix SOCK_SEQPACKET socket per service, created by the supervisor. Every datagram is exactly
# one `Envelope` in the standard (unpacked) Cap'n Proto stream framing; file descriptors travel
# alongside it as SCM_RIGHTS ancillary data and are named by their position in that fd array.
#
# Conversation:
#   service    -> supervisor  hello      (first message after the socket is handed over)
#   supervisor -> service     start      (fresh or restart, with the resources it hands over)
#   service    -> supervisor  ready      (init done; the service now serves)
#   service    -> supervisor  heartbeat  (periodically, answered by ack)
#   supervisor -> service     shutdown   (answered by ack, then the service exits)
#   supervisor -> service     inject     (crash injection for testing: the service fails as told)
#   either     -> either      ack / error (answer to the request with the echoed id)
#
# Compatibility: fields are only ever appended (new ordinal, new union member, new enumerant);
# nothing is renumbered or removed. A receiver rejects union members and enumerants it does not
# know instead of guessing. Bump `protocolVersion` in `Hello` when the meaning of a message
# changes.
#
# The Rust mirror of these messages, with the bounds every receiver enforces (text lengths, list
# lengths, fd indices), is `duplex_ipc::control`.

@0xd974801799f2c6f8;

struct Envelope {
  # One control message: routing data common to every message, then exactly one body.

  requestId @0 :UInt64;
  # Sender-chosen id of this message, unique per sender per channel for the sender's lifetime
  # (a counter starting at 1). Answers (`ack`, `error`) name it; 0 is never used for a request.

  epoch @1 :UInt64;
  # The sender's generation: the supervisor's own generation for its messages, the service's
  # generation (as given in `Start.generation`) for the service's. Lets the receiver discard
  # messages from a previous incarnation of its peer. 0 before the service has been started.

  body :union {
    # What the message is. Exactly one member is set.

    hello @2 :Hello;
    # Service -> supervisor: first message, identifies the service.

    start @3 :Start;
    # Supervisor -> service: begin (fresh or restart) with these handed-over resources.

    ready @4 :Ready;
    # Service -> supervisor: initialisation is complete and the service serves.

    heartbeat @5 :Heartbeat;
    # Service -> supervisor: liveness signal; the supervisor answers with `ack`.

    shutdown @6 :Shutdown;
    # Supervisor -> service: stop serving and exit before the deadline.

    ack @7 :Ack;
    # Either direction: the named request was received and handled successfully.

    error @8 :Error;
    # Either direction: the named request (or the channel as a whole) failed.

    inject @9 :Inject;
    # Supervisor -> service: crash injection. The service fails in the named way at once; it
    # does not answer. (A SIGKILL needs no message: the supervisor sends the signal itself.)

    report @10 :Text;
    # Service -> supervisor: the service's status report (a JSON document of at most 4096
    # bytes), replacing its last one; the supervisor keeps it for `duplexctl` (admin
    # `serviceReport`). Not answered.

    event @11 :Event;
    # Service -> supervisor: something an operator should learn of (a takeover, a failed drive,
    # a rebuild started or ended, a configuration change, a refused host). The supervisor adds
    # it to the node's event journal (`duplexctl events`), kept in the state directory across
    # restarts of every service and of duplexd. Not answered; rate-limited per service.
  }
}

struct Event {
  level @0 :EventLevel;
  kind @1 :Text;
  # A short machine-readable name, 1..=64 bytes of [a-z0-9-] (e.g. `pool-taken-over`).
  message @2 :Text;
  # One line for the operator, at most 1024 bytes.
}

enum EventLevel {
  info @0;
  warning @1;
  error @2;
}

struct Inject {
  # Supervisor -> service: fail now, in this way (crash-injection testing, `duplexctl service
  # crash`).

  fault @0 :Fault;
}

enum Fault {
  # How an injected failure shows.

  panic @0;
  # Panic on the thread that received the message; services abort on panic, so the process
  # dies with SIGABRT.

  hang @1;
  # Stop beating the heartbeat and block the receiving thread forever, as a deadlocked service
  # would; the supervisor must notice the missed beats and kill it.

  forbiddenSyscall @2;
  # Attempt a system call the service's seccomp policy forbids (opening a path); the sandbox
  # kills the process with SIGSYS. Proves the sandbox is in force in the running service.
}

struct Hello {
  # Service -> supervisor: who is speaking.

  service @0 :Text;
  # The service's name as in the supervisor's service table (e.g. "datapath", "fabric").
  # At most 256 bytes of UTF-8.

  pid @1 :UInt32;
  # The service's process id, as the service sees it (getpid()).

  protocolVersion @2 :UInt32;
  # Version of this lifecycle protocol the service speaks. Currently 1.
}

struct Start {
  # Supervisor -> service: the instruction to begin serving.

  generation @0 :UInt64;
  # The service's generation: 1 for its first start on this boot of the supervisor, incremented
  # on every restart. The service uses it as the `epoch` of every message it sends from now on.

  mode @1 :StartMode;
  # Which init path the service must take.

  resources @2 :List(Resource);
  # The resources handed over with this message: exactly one per file descriptor passed with it.
  # At most 64 entries, the most descriptors one message may carry.
}

enum StartMode {
  # How a service initialises (the Minix fresh/restart split).

  fresh @0;
  # No predecessor: create state from scratch (shared regions are newly created and zeroed).

  restart @1;
  # A predecessor ran and died: re-attach to the handed-over shared memory and rings, reclaim
  # what the predecessor held, and re-read on-disk state.
}

struct Resource {
  # One handed-over file descriptor and what it is.

  name @0 :Text;
  # Stable name of the resource (e.g. "pool", "ring.fabric0.sq"). At most 256 bytes of UTF-8.

  kind @1 :ResourceKind;
  # What the descriptor refers to, so the service can attach it the right way.

  fdIndex @2 :UInt32;
  # Index into the array of descriptors passed with this message via SCM_RIGHTS. Must be smaller
  # than the number of descriptors received; receivers reject the message otherwise.
}

enum ResourceKind {
  # What a handed-over descriptor refers to.

  region @0;
  # A sealed memfd holding a shared memory region (duplex_ipc::region).

  ringRegion @1;
  # A sealed memfd holding an SPSC descriptor ring (duplex_ipc::ring).

  pool @2;
  # A sealed memfd holding the shared buffer pool (duplex_ipc::pool).

  eventfd @3;
  # An eventfd used as a doorbell.

  socket @4;
  # A socket (a listening socket, or another control channel).

  file @5;
  # An opened file or device node.
}

struct Ready {
  # Service -> supervisor: initialisation complete.

  generation @0 :UInt64;
  # The generation from the `Start` this answers; a stale `Ready` of an older generation is
  # ignored by the supervisor.
}

struct Heartbeat {
  # Service -> supervisor: still alive.

  counter @0 :UInt64;
  # Monotonic per-generation heartbeat counter starting at 1; lets the supervisor notice gaps.
}

struct Shutdown {
  # Supervisor -> service: orderly stop.

  reason @0 :Text;
  # Human-readable reason, for logs. At most 4096 bytes of UTF-8.

  deadlineMs @1 :UInt32;
  # Milliseconds the service has, from receipt, to exit before the supervisor kills it.
}

struct Ack {
  # Either direction: success answer.

  requestId @0 :UInt64;
  # The `Envelope.requestId` of the message being acknowledged.
}

struct Error {
  # Either direction: failure answer.

  requestId @0 :UInt64;
  # The `Envelope.requestId` of the message that failed, or 0 if the error concerns the channel
  # rather than one message.

  code @1 :ErrorCode;
  # Machine-readable class of the failure.

  message @2 :Text;
  # Human-readable detail, for logs. At most 4096 bytes of UTF-8.
}

enum ErrorCode {
  # Classes of lifecycle failures.

  internal @0;
  # The receiver failed for a reason of its own (a bug or a resource shortage).

  malformed @1;
  # The message could not be decoded or violated a bound (text length, list length, fd index).

  unsupportedVersion @2;
  # The `Hello.protocolVersion` is not one the supervisor speaks.

  unexpected @3;
  # The message is valid but not allowed in the receiver's current state (e.g. `start` twice).

  badResource @4;
  # A handed-over resource could not be used (wrong kind, failed validation, missing).

  staleEpoch @5;
  # The message carried the epoch of an earlier generation of its sender.
}
