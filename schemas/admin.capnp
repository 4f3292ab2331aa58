# The admin channel: mgmt -> supervisor (duplexd).
#
# One Unix SOCK_SEQPACKET socket, created by the supervisor and handed to the mgmt service only:
# this is the privilege to see and act on the service table (restart, crash-inject). No other
# service holds such a socket, and nothing else travels on it (crosvm's habit: one channel per
# privilege class). No file descriptors travel on it. Every datagram is exactly one message in
# the standard (unpacked) Cap'n Proto stream framing:
#
#   mgmt       -> supervisor  AdminRequest
#   supervisor -> mgmt        AdminReply (same requestId)
#
# Compatibility: as lifecycle.capnp (append only; unknown members and enumerants are rejected).

@0xb4e1c8a2f6d3907e;

struct AdminRequest {
  requestId @0 :UInt64;
  # Sender-chosen, non-zero, unique per channel; the reply echoes it.

  body :union {
    listServices @1 :Void;
    # The service table.

    restartService @2 :Text;
    # Stop the named service (SIGTERM, then SIGKILL after the stop timeout) and start it again
    # at once as a restart. Also brings a failed (crash-looping) service back.

    crashService @3 :CrashService;
    # Crash-inject the named service.

    nodeStatus @4 :Void;
    # The node summary.

    serviceReport @5 :Text;
    # The last status report the named service sent (lifecycle `report`): answered by `report`.

    events @6 :UInt64;
    # The node's events numbered above this one, oldest first (as many as fit one reply).
  }
}

struct CrashService {
  name @0 :Text;
  # Service name, at most 256 bytes.

  mode @1 :CrashMode;
}

enum CrashMode {
  kill @0;
  # The supervisor sends SIGKILL.

  panic @1;
  # The service panics (and aborts) on receiving `Inject`.

  hang @2;
  # The service stops its heartbeat and blocks; the supervisor's watchdog must kill it.

  forbiddenSyscall @3;
  # The service attempts a system call its seccomp policy forbids; the sandbox kills it.
}

struct AdminReply {
  requestId @0 :UInt64;
  # The request answered.

  body :union {
    services @1 :List(ServiceInfo);
    # Answer to listServices. At most 64 entries.

    done @2 :Text;
    # Answer to restartService / crashService: what the supervisor did, for humans.

    error @3 :AdminError;
    # The request failed.

    status @4 :NodeStatus;
    # Answer to nodeStatus.

    report @5 :ServiceReport;
    # Answer to serviceReport.

    events @6 :Text;
    # Answer to events: a JSON array of event objects (seq, at_unix_ms, node, source, level,
    # kind, message), at most 48 KiB.
  }
}

struct ServiceReport {
  generation @0 :UInt64;
  # The generation of the process that sent it; 0 if the service never sent one.

  text @1 :Text;
  # The report (JSON, at most 4096 bytes); empty if none.
}

struct ServiceInfo {
  name @0 :Text;
  kind @1 :ServiceKind;
  state @2 :ServiceState;
  pid @3 :UInt32;
  # 0 when no process runs.
  generation @4 :UInt64;
  # 1 on the first start; +1 on every start after that.
  restarts @5 :UInt32;
  # Starts after the first one (for any reason: crash, hang, injection, operator).
  uptimeMs @6 :UInt64;
  # Since the current process was spawned; 0 when none runs.
  hangs @7 :UInt32;
  # Times the watchdog found it hung (missed heartbeats) and killed it.
  lastExit @8 :Text;
  # How the previous process ended ("signal 9 (SIGKILL)", "exit status 3", ...); empty if none.
  lastRestartMs @9 :UInt64;
  # Time from the previous process's death to the new one saying Ready; 0 if none yet.
}

enum ServiceKind {
  service @0;
  datapath @1;
}

enum ServiceState {
  starting @0;
  running @1;
  backoff @2;
  failed @3;
  stopped @4;
}

struct AdminError {
  code @0 :AdminErrorCode;
  message @1 :Text;
  # For humans; at most 4096 bytes.
}

enum AdminErrorCode {
  unknownService @0;
  # No service of that name.
  notAllowed @1;
  # The request is refused for this service (e.g. crash-injecting the datapath).
  failed @2;
  # The supervisor tried and failed.
  malformed @3;
  # The request could not be decoded or broke a bound.
}

struct NodeStatus {
  node @0 :Text;
  # The node's name from its config.
  supervisorPid @1 :UInt32;
  uptimeMs @2 :UInt64;
  # Since duplexd started.
  failed @3 :Bool;
  # The datapath died: the node does not serve.
  servicesRunning @4 :UInt32;
  servicesTotal @5 :UInt32;
  sandbox @6 :Bool;
  # Whether services run under their seccomp policies (false only with the dev switch).
}
