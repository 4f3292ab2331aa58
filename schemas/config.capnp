# The config channel: mgmt -> metadata.
#
# One Unix SOCK_SEQPACKET socket pair, created by the supervisor when the node config has both a
# service named `mgmt` and one named `metadata`; each gets its end as the resource `config`, and
# the supervisor keeps both ends, so the channel outlives the restarts of either. Holding mgmt's
# end is the privilege to change the node's storage configuration (pools, volumes, subsystems,
# namespaces, hosts): only mgmt holds it, nothing else travels on it (one channel per privilege
# class), and no file descriptors do. The metadata service owns that configuration and persists
# it on the drives (docs/ONDISK.md). Every datagram is exactly one message in the standard
# (unpacked) Cap'n Proto stream framing, at most 64 KiB:
#
#   mgmt     -> metadata  ConfigRequest
#   metadata -> mgmt      ConfigReply (same requestId)
#
# mgmt sends one request at a time and waits up to 30 s for its reply (a commit writes and
# flushes every member drive of a pool); a reply that comes later is discarded by its requestId.
# The request and reply bodies are structs of their own (not groups) so that mgmt's RPC interface
# (mgmt.capnp, `config`) carries them unchanged between duplexctl and this channel.
#
# Which reply answers which request: listDrives -> drives; listPools -> pools; showPool -> pools
# with exactly the one pool; listVolumes -> volumes; listSubsystems -> subsystems; every other
# request -> done. Any request may be answered by error instead. Nothing is changed when the
# answer is error.
#
# Bounds: every text and list below has one, enforced by both ends (`duplex_ipc::config`) and
# chosen so that the largest reply within them fits one datagram. Names of drives, pools and
# volumes are 1..=64 bytes (docs/ONDISK.md), NQNs 1..=223 bytes (NVMe), messages at most 4096
# bytes. A node whose configuration would exceed a list's bound cannot be listed whole: the
# metadata service refuses to create more than these (`noSpace`).
#
# Compatibility: as lifecycle.capnp (append only; unknown members and enumerants are rejected).

@0xbb9905d8ac26d957;

struct ConfigRequest {
  requestId @0 :UInt64;
  # Sender-chosen, non-zero, unique per channel for as long as the channel exists (mgmt starts
  # each of its generations at generation << 32, so a restarted mgmt never reuses an id whose
  # late reply may still be queued). The reply echoes it.

  body @1 :ConfigRequestBody;
  # Required.
}

struct ConfigRequestBody {
  union {
    listDrives @0 :Void;
    # Every drive the node sees, free or a pool's member, and the members it expects but does
    # not see (state `missing`). At most 64.

    createPool @1 :CreatePool;
    # Make a pool of free drives: their superblocks and the first metadata image are written
    # and flushed before the reply. Answer: done, with the pool's uuid.

    listPools @2 :Void;
    # Every pool the node knows. At most 16.

    showPool @3 :Text;
    # One pool, by name, with its members.

    destroyPool @4 :DestroyPool;
    # Forget a pool: its drives become free. Refused (`inUse`) while it holds volumes, unless
    # `force`, which also deletes its volumes and the namespaces exporting them.

    createVolume @5 :CreateVolume;
    # A thick volume in a pool. Answer: done, with the volume's uuid.

    listVolumes @6 :Void;
    # Every volume, with the namespaces that export it. At most 128.

    resizeVolume @7 :ResizeVolume;
    # Grow (or shrink, if the metadata service allows it) a volume to `sizeBytes`.

    deleteVolume @8 :Text;
    # Delete a volume by name. Refused (`inUse`) while a namespace exports it.

    createSubsystem @9 :Text;
    # An NVMe subsystem with this NQN, no namespace, no host allowed yet.

    listSubsystems @10 :Void;
    # Every subsystem with its hosts and namespaces. At most 32.

    deleteSubsystem @11 :Text;
    # Delete a subsystem by NQN. Refused (`inUse`) while it has namespaces.

    addNamespace @12 :AddNamespace;
    # Export a volume as a namespace of a subsystem. Answer: done, with the nsid assigned.

    removeNamespace @13 :RemoveNamespace;
    # Stop exporting a namespace (the volume stays).

    allowHost @14 :HostAccess;
    # Add a host NQN to a subsystem's allow-list.

    denyHost @15 :HostAccess;
    # Remove a host NQN from a subsystem's allow-list.

    allowAnyHost @16 :AllowAnyHost;
    # Let any host connect to a subsystem (or, with `any` false, only those allowed).

    importPool @17 :ImportPool;
    # Import a pool the node found on its drives but did not import at start (listDrives shows
    # its drives `stale`, their pool named by its uuid). Without `force` the import rule is the
    # start's; with it, active members that are missing are accepted and failed in a new
    # generation, and a superblock newer than every image is overruled.

    listVolumesAfter @18 :Text;
    # The volumes whose names sort after this one (empty: from the first), in name order, as
    # many as one reply holds (at most 128, with at most 96 exports in all): a caller pages with
    # the last name it got until a reply lists none. (listVolumes is the first page.)

    movePool @19 :MovePool;
    # A planned move of a pool this node owns to the peer controller (giveback): its ANA group
    # goes to change here, its I/O drains, its ownership record is committed to the peer with
    # the next epoch, the group goes inaccessible here; the peer imports it when it hears of
    # the change. Refused on a node that does not own the pool or has no live peer.

    scrubPool @21 :Text;
    # Start a scrub of a RAID 5 or 6 pool this node owns: every stripe's parity checked against
    # its data and rewritten where it disagrees. Answered once started; listPools / showPool say
    # how far it got and what it found.

    addSpare @23 :AddSpare;
    # Reserve a free drive as a hot spare of a RAID 5 or 6 pool this node owns: when a member
    # fails, the spare takes its slot and is rebuilt.

    setPoolRate @22 :SetPoolRate;
    # Set the rate of a pool's rebuilds and scrubs (bytes/s; 0: yield to host I/O, the
    # default), for the raid service; applies at once to a running one.

    replaceMember @20 :ReplaceMember;
    # Put a free drive in place of a failed member of a RAID 5 or 6 pool this node owns: the
    # member is committed rebuilding on the new drive and the datapath rebuilds it under I/O;
    # the metadata service commits it active when the datapath reports it rebuilt.
  }
}

struct AddSpare {
  pool @0 :Text;
  # 1..=64 bytes.

  drive @1 :Text;
  # A free drive's name, 1..=64 bytes.
}

struct SetPoolRate {
  pool @0 :Text;
  # 1..=64 bytes.

  rate @1 :UInt64;
  # Bytes per second of each member; 0: yield to host I/O.
}

struct ReplaceMember {
  pool @0 :Text;
  # The pool, 1..=64 bytes.

  old @1 :Text;
  # The drive name of the failed member (as listDrives names it), 1..=64 bytes.

  new @2 :Text;
  # A free drive's name, 1..=64 bytes.
}

struct MovePool {
  name @0 :Text;
  # The pool, 1..=64 bytes.

  node @1 :UInt16;
  # The node id (1..=4) to move it to: the peer's.
}

struct ImportPool {
  pool @0 :Text;
  # The pool's uuid (canonical lowercase text), as listDrives names it.

  force @1 :Bool;
}

struct CreatePool {
  name @0 :Text;
  # 1..=64 bytes, no control characters, unique on the node.

  raid @1 :RaidLevel;

  drives @2 :List(Text);
  # Names of free drives (as listDrives gives them), in slot order; 1..=64 entries, each 1..=64
  # bytes. RAID 10 mirror pairs are slots 0+1, 2+3, ...

  chunkBytes @3 :UInt32;
  # Stripe chunk: a power of two, 4096..=1048576; 0 = the default, 64 KiB.
}

enum RaidLevel {
  raid0 @0;
  # Striping, no redundancy: every member is needed.
  raid1 @1;
  # Mirroring across all members.
  raid10 @2;
  # Striping over mirror pairs; an even number of members, at least 4.
  raid5 @3;
  # Rotating single parity; at least 3 members, survives one lost.
  raid6 @4;
  # Rotating double parity (P and Q); at least 4 members, survives two lost.
}

struct DestroyPool {
  name @0 :Text;
  # 1..=64 bytes.
  force @1 :Bool;
}

struct CreateVolume {
  name @0 :Text;
  # 1..=64 bytes, no control characters, unique on the node.
  pool @1 :Text;
  # 1..=64 bytes.
  sizeBytes @2 :UInt64;
  # Not 0; the metadata service may round it up to whole blocks or chunks and says so in done.
}

struct ResizeVolume {
  name @0 :Text;
  # 1..=64 bytes.
  sizeBytes @1 :UInt64;
  # The new size; not 0.
}

struct AddNamespace {
  nqn @0 :Text;
  # The subsystem; 1..=223 bytes.
  volume @1 :Text;
  # 1..=64 bytes.
  nsid @2 :UInt32;
  # 0 = the lowest free nsid of the subsystem.
}

struct RemoveNamespace {
  nqn @0 :Text;
  # 1..=223 bytes.
  nsid @1 :UInt32;
}

struct HostAccess {
  nqn @0 :Text;
  # The subsystem; 1..=223 bytes.
  hostNqn @1 :Text;
  # The host; 1..=223 bytes.
  dhchapSecret @2 :Text;
  # allowHost only: the host's DH-HMAC-CHAP secret in the standard representation
  # (`DHHC-1:XX:base64:`); empty: the host connects without authentication. Set again on an
  # allowed host: its secret is replaced.
  dhchapCtrlSecret @3 :Text;
  # allowHost only: the controller's secret, for bidirectional authentication when the host
  # asks for it; empty: none. Needs dhchapSecret.
  tlsPsk @4 :Text;
  # allowHost only: the host's configured TLS PSK in the interchange format
  # (`NVMeTLSkey-1:HH:base64:`, as `nvme gen-tls-key` prints it); empty: none. The host needs it
  # on listeners that require TLS.
}

struct AllowAnyHost {
  nqn @0 :Text;
  # 1..=223 bytes.
  any @1 :Bool;
}

struct ConfigReply {
  requestId @0 :UInt64;
  # The request answered.

  body @1 :ConfigReplyBody;
  # Required.
}

struct ConfigReplyBody {
  union {
    done @0 :Done;
    # A change was made and is durable (written and flushed on the pool's drives).

    drives @1 :List(DriveInfo);
    # Answer to listDrives. At most 64 entries.

    pools @2 :List(PoolInfo);
    # Answer to listPools (at most 16 entries) and showPool (exactly one). At most 128 members
    # in all the pools of one reply.

    volumes @3 :List(VolumeInfo);
    # Answer to listVolumes. At most 128 entries, at most 96 exports in all.

    subsystems @4 :List(SubsystemInfo);
    # Answer to listSubsystems. At most 32 entries, at most 128 hosts and 96 namespaces in all.

    error @5 :ConfigError;
    # The request failed; nothing was changed.
  }
}

struct Done {
  message @0 :Text;
  # What was done, for humans, one line (e.g. "created pool tank (raid1, 2 drives)"); at most
  # 4096 bytes.

  nsid @1 :UInt32;
  # addNamespace: the nsid assigned. 0 otherwise.

  uuid @2 :Text;
  # createPool, createVolume: the UUID created, as in PoolInfo.uuid. Empty otherwise.
}

struct ConfigError {
  kind @0 :ConfigErrorKind;
  message @1 :Text;
  # For humans, one line, naming what was wrong (e.g. "drive d3 belongs to pool tank"); at most
  # 4096 bytes.
}

enum ConfigErrorKind {
  invalidArgument @0;
  # The request breaks a rule: a bad name or NQN, a size of 0, a chunk that is not a power of
  # two, the wrong number of drives for the RAID level, ...
  notFound @1;
  # A named drive, pool, volume, subsystem, namespace or host does not exist.
  alreadyExists @2;
  # The name, NQN, nsid or host is taken.
  inUse @3;
  # The object is used by another (a drive in a pool, a volume exported, a subsystem with
  # namespaces, a pool with volumes).
  noSpace @4;
  # Not enough free capacity in the pool, or a limit of the node would be exceeded.
  notReady @5;
  # The metadata service cannot act yet or now (pools still being imported, a pool offline, the
  # node does not own the pool).
  ioError @6;
  # Writing or flushing a drive failed; the change was not made (the previous image stands).
  refused @7;
  # The request is understood but not allowed (e.g. shrinking a volume, changing a pool the
  # node does not own).
}

struct DriveInfo {
  name @0 :Text;
  # The node's name for the drive; 1..=64 bytes.
  address @1 :Text;
  # Where it is reached: "vfio:0000:00:04.0", "vfio-user:drives/d0-a.sock", ...; at most 256
  # bytes; empty when missing.
  capacityBytes @2 :UInt64;
  blockSize @3 :UInt32;
  # 512 or 4096; 0 when missing.
  model @4 :Text;
  # NVMe Identify model number, trimmed; at most 40 bytes.
  serial @5 :Text;
  # NVMe Identify serial number, trimmed; at most 20 bytes.
  pool @6 :Text;
  # The pool it is a member of; empty when free. At most 64 bytes.
  slot @7 :UInt32;
  # Its slot in that pool; 0 when free.
  state @8 :DriveState;
  integrityErrors @9 :UInt64;
  # Blocks the drive returned that failed their integrity check (drives formatted with
  # metadata), since the datapath started.
}

enum DriveState {
  free @0;
  # No pool: may be given to createPool.
  active @1;
  # A current member of its pool.
  failed @2;
  # A member the pool stopped using after an error.
  stale @3;
  # Holds a pool's superblock that the pool no longer counts as current (an older generation
  # or epoch, or a pool this node did not import); not free until the pool is destroyed or the
  # drive is reused on purpose.
  rebuilding @4;
  # A member being brought up to date.
  missing @5;
  # A member the pool expects that the node does not see.
  spare @6;
  # A hot spare of its pool: taken into a failed member's slot when one fails.
}

struct PoolInfo {
  name @0 :Text;
  # 1..=64 bytes.
  uuid @1 :Text;
  # Canonical lowercase 8-4-4-4-12 form, 36 bytes.
  raid @2 :RaidLevel;
  chunkBytes @3 :UInt32;
  capacityBytes @4 :UInt64;
  # What volumes may use in all (after redundancy).
  freeBytes @5 :UInt64;
  # What is not allocated to volumes.
  state @6 :PoolState;
  generation @7 :UInt64;
  # Of the newest metadata image (+1 on every commit).
  epoch @8 :UInt64;
  # Ownership epoch (+1 on every change of owner).
  ownerNode @9 :UInt32;
  # The owning node's id (0..=3).
  members @10 :List(PoolMember);
  # In slot order; at most 64.
  memberBytes @11 :UInt64;
  # Bytes of each member's data area (what a rebuild or a scrub goes through).
  rebuildSlot @12 :UInt32;
  rebuildDone @13 :UInt64;
  # The member being rebuilt and the bytes of it rebuilt (0xffffffff: none).
  scrubbed @14 :Bool;
  # A scrub ran or runs (this controller's datapath since it started); then:
  scrubDone @15 :UInt64;
  # Bytes of each member checked (done at memberBytes).
  scrubMismatches @16 :UInt64;
  scrubRepaired @17 :UInt64;
  scrubSkipped @18 :UInt64;
  rateLimit @19 :UInt64;
  # The operator's rate for the pool's rebuilds and scrubs, bytes/s (0: the raid service's
  # default, yielding to host I/O).
  rebuildRate @20 :UInt64;
  rebuildEtaMs @21 :UInt64;
  # The rebuild's measured rate (bytes/s) and the time left (ms; 0xffffffffffffffff unknown),
  # as the raid service measures them (0 and unknown without one).
  rebuildFrom @22 :UInt64;
  # Where this run of the rebuild started (a resumed rebuild: the checkpoint it resumed from).
  rebuildCheckpoint @23 :UInt64;
  # The rebuild position committed on the pool's drives (bytes of the member).
  scrubRate @24 :UInt64;
  scrubEtaMs @25 :UInt64;
  # The scrub's, as the rebuild's.
  spares @26 :List(Text);
  # The pool's hot spares, by drive name (the UUID for one this node does not see); at most 8.

  integrityRecovered @27 :UInt64;
  # Reads that met a copy failing its integrity check and were served from a good copy, since
  # the datapath started.
  integrityHealed @28 :UInt64;
  # Bad copies rewritten from a good one.
  integrityUnrecoverable @29 :UInt64;
  # Reads with no good copy left (a media error to the host, never wrong data).
}

enum PoolState {
  online @0;
  # Every member current.
  degraded @1;
  # Serving, with a member failed, missing or rebuilding: less redundancy than configured.
  offline @2;
  # Not serving: too many members lost, or not imported.
}

struct PoolMember {
  drive @0 :Text;
  # The drive's name (as in DriveInfo.name); 1..=64 bytes.
  driveUuid @1 :Text;
  # The drive's UUID in the pool (its superblock), 36 bytes as PoolInfo.uuid.
  slot @2 :UInt32;
  state @3 :DriveState;
  # active, failed, rebuilding or missing.
}

struct VolumeInfo {
  name @0 :Text;
  # 1..=64 bytes.
  uuid @1 :Text;
  # 36 bytes, as PoolInfo.uuid.
  nguid @2 :Text;
  # 32 lowercase hex digits: the NGUID hosts see for each namespace exporting it.
  pool @3 :Text;
  # 1..=64 bytes.
  sizeBytes @4 :UInt64;
  blockSize @5 :UInt32;
  exports @6 :List(Export);
  # The namespaces that export it.
}

struct Export {
  nqn @0 :Text;
  # 1..=223 bytes.
  nsid @1 :UInt32;
}

struct SubsystemInfo {
  nqn @0 :Text;
  # 1..=223 bytes.
  allowAnyHost @1 :Bool;
  hosts @2 :List(Text);
  # Allowed host NQNs, each 1..=223 bytes.
  namespaces @3 :List(NamespaceInfo);
  # In nsid order.
  hostsAuthenticate @4 :List(Bool);
  # Parallel to hosts: true for a host that must authenticate (its DH-HMAC-CHAP secrets are
  # set); empty: no host must.
}

struct NamespaceInfo {
  nsid @0 :UInt32;
  volume @1 :Text;
  # 1..=64 bytes.
  nguid @2 :Text;
  # 32 lowercase hex digits.
  anaGroup @3 :UInt32;
}
