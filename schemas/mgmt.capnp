# The management API: duplexctl (or any client) -> mgmt, Cap'n Proto RPC (capnp-rpc, two-party
# VatNetwork) over the Unix stream socket `<state_dir>/mgmt.sock`.
#
# The socket is created and held by the supervisor and handed to mgmt, so it survives mgmt's
# restarts: a client that connects while mgmt is down waits in the listen backlog and is served
# by the next mgmt. Answers reuse the admin channel's structures (admin.capnp), and the storage
# configuration calls the config channel's (config.capnp).
#
# Compatibility: methods and fields are only appended.

@0xe93a5f0b7c2d4168;

using Admin = import "admin.capnp";
using Config = import "config.capnp";

interface Management {
  status @0 () -> (status :Admin.NodeStatus);
  # Node summary.

  listServices @1 () -> (services :List(Admin.ServiceInfo));
  # The service table.

  restartService @2 (name :Text) -> (message :Text);
  # Restart a service (see AdminRequest.restartService).

  crashService @3 (name :Text, mode :Admin.CrashMode) -> (message :Text);
  # Crash-inject a service. Crashing mgmt itself may end the connection before the answer.

  config @4 (request :Config.ConfigRequestBody) -> (reply :Config.ConfigReplyBody);
  # A storage configuration request (pools, volumes, subsystems, namespaces, hosts), carried
  # as is to the metadata service on the config channel; its reply comes back as is, `error`
  # included. Fails (an RPC exception) when the node has no metadata service, when it is not
  # running, or when it does not answer within 30 s; a changing request may then have been
  # carried out or not.

  serviceReport @5 (name :Text) -> (generation :UInt64, report :Text);
  # The last status report of the named service (JSON; empty, generation 0, if it never sent
  # one). `duplexctl cluster status` shows the cluster service's.

  events @6 (after :UInt64) -> (events :Text);
  # The node's events numbered above `after`, oldest first, as many as fit one answer: a JSON
  # array of objects (seq, at_unix_ms, node, source, level, kind, message). `duplexctl events`.
}
